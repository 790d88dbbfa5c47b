"""Human-facing output in <build>/report/: the Pareto plot (PNG, where matplotlib is installed) and a summary table
(Markdown). Runs on a device too: it reads the manifest (and eval.jsonl where the build has one)."""

from __future__ import annotations

from pathlib import Path


def _points(manifest: dict, device_key: str | None):
    from snexport.device.manifest import engine_ids

    rows = []
    for e, engine_id in zip(manifest["engines"], engine_ids(manifest["engines"])):  # an int8 file: its own point
        m = e["measurements"].get(device_key) if device_key else None
        rows.append({
            "id": engine_id,
            "stitch_id": e["stitch_id"],
            "anchor": e["route"]["cut"] is None,
            "top1": e["accuracy"]["top1"],
            "gflops": e["gflops"],
            "latency": m["latency_ms"]["p50"] if m else None,
            "p90": m["latency_ms"]["p90"] if m else None,
            "memory": m["memory"]["rss_load_delta_mb"] if m else None,
            "params_m": e["params"] / 1e6,
            "pareto": bool(m and m["pareto"]),
            "ci": (m.get("latency_noise") or {}).get("p50_ci") if m else None,
            "energy": ((m.get("energy") or {}).get("mj_per_inference")) if m else None,
            "tied": m.get("tied_with", []) if m else [],
        })
    return rows


def plot_axes(rows: list[dict], x_axis: str = "latency") -> tuple[tuple[str, str], tuple[str, str]]:
    """(x key, label), (y key, label): measured latency (or energy, with ``x_axis="energy"``) else GFLOPs;
    accuracy when known, else what is known about cost (measured memory, or the parameter count), so an
    architecture-only build still gets a plot."""
    measured = any(r["latency"] is not None for r in rows)
    known = any(r["top1"] is not None for r in rows)
    if x_axis == "energy" and any(r["energy"] is not None for r in rows):
        x = ("energy", "measured energy per inference (mJ)")
    else:
        x = ("latency", "measured latency p50 (ms), bars: its confidence interval") if measured else (
            "gflops", "GFLOPs (paper convention)")
    if known:
        return x, ("top1", "top-1 accuracy (%)")
    return x, (("memory", "memory (MB), accuracy unknown") if measured else ("params_m", "parameters (M), accuracy unknown"))


def pareto_plot(manifest: dict, device_key: str | None, path: Path, evals: dict | None = None,
                x_axis: str = "latency") -> Path:
    """Accuracy vs measured latency (GFLOPs when not profiled); anchors starred, the device's Pareto front joined.
    Latency points carry their p50 confidence interval as horizontal bars: points whose bars overlap are tied.

    Configurations that were evaluated but not exported are drawn faintly, so the plot shows what selection left
    out as well as what it kept.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _points(manifest, device_key)
    (xkey, xlabel), (ykey, ylabel) = plot_axes(rows, x_axis)
    measured, known = xkey in ("latency", "energy"), ykey == "top1"
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    if evals and not measured and known:
        others = [e for sid, e in evals.items() if sid not in {r["stitch_id"] for r in rows} and e.top1 is not None]
        ax.scatter([e.gflops for e in others], [e.top1 for e in others], s=14, color="0.75",
                   label="other configurations")
    ys = [r[ykey] for r in rows]
    xs = [r[xkey] for r in rows]
    for r, x, y in zip(rows, xs, ys):
        if x is None or y is None:
            continue
        if xkey == "latency" and r["ci"]:
            lo, hi = r["ci"]
            ax.errorbar([x], [y], xerr=[[max(x - lo, 0.0)], [max(hi - x, 0.0)]], fmt="none", ecolor="0.55",
                        elinewidth=1, capsize=2, zorder=1)
        if r["anchor"]:
            ax.scatter([x], [y], marker="*", s=220, color="tab:red", zorder=3)
            ax.annotate(r["id"], (x, y), textcoords="offset points", xytext=(6, -12), fontsize=9, color="tab:red")
        else:
            ax.scatter([x], [y], s=28, color="tab:blue" if r["pareto"] or not measured else "tab:gray", zorder=2)
    front = sorted((x, y) for r, x, y in zip(rows, xs, ys) if r["pareto"] and x is not None and y is not None)
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "-", color="tab:blue", alpha=0.6,
                label="Pareto front on this device")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    device = (manifest.get("devices", {}).get(device_key, {}) or {}).get("profile", "") if device_key else ""
    ax.set_title(f"SN-Net stitches: {', '.join(a['name'] for a in manifest['build']['anchors'])}"
                 + (f" on {device}" if device else ""))
    ax.grid(alpha=0.3)
    ax.scatter([], [], marker="*", s=120, color="tab:red", label="anchors")
    if measured and any(not r["pareto"] and not r["anchor"] for r in rows):
        ax.scatter([], [], s=28, color="tab:gray", label="exported, dominated on this device")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def summary_markdown(manifest: dict, device_key: str | None) -> str:
    rows = sorted(_points(manifest, device_key), key=lambda r: (r["latency"] is None, r["latency"] or r["gflops"]))
    lines = ["| engine | top-1 % | GFLOPs | p50 ms | p50 CI ms | p90 ms | memory MB | energy mJ | Pareto |",
             "|---|---:|---:|---:|---:|---:|---:|---:|:-:|"]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for r in rows:
        ci = f"{r['ci'][0]:.3f}–{r['ci'][1]:.3f}" if r["ci"] else "-"
        front = ("yes" + (f" (tied: {', '.join(r['tied'])})" if r["tied"] else "")) if r["pareto"] else ""
        top1 = f(r["top1"], ".2f") if r["top1"] is not None else "unknown"
        lines.append(f"| {r['id']}{' (anchor)' if r['anchor'] else ''} | {top1} | {r['gflops']:.4f} "
                     f"| {f(r['latency'], '.3f')} | {ci} | {f(r['p90'], '.3f')} | {f(r['memory'], '.1f')} "
                     f"| {f(r['energy'], '.3f')} | {front} |")
    return "\n".join(lines) + "\n"


def write_report(build, manifest: dict, device_key: str | None) -> dict:
    """report/summary.md always; report/pareto.png where matplotlib is installed, else ``note`` says how to get it.

    Returns {"summary": path, "plot": path or None, "note": one line}.
    """
    import importlib.util

    from snexport.hashing import atomic_write_text

    table = build.report_dir / "summary.md"
    atomic_write_text(table, summary_markdown(manifest, device_key))
    if importlib.util.find_spec("matplotlib") is None:
        return {"summary": table, "plot": None,
                "note": f"report: {table} (no plot: matplotlib is not installed; pip install 'snexport[report]')"}
    plot = pareto_plot(manifest, device_key, build.report_dir / "pareto.png", build.read_eval())
    note = f"report: {plot}, {table}"
    if any(r["energy"] is not None for r in _points(manifest, device_key)):
        energy_plot = pareto_plot(manifest, device_key, build.report_dir / "pareto-energy.png", x_axis="energy")
        note += f", {energy_plot}"
    return {"summary": table, "plot": plot, "note": note}
