"""Top-1 accuracy, FLOPs and params of every configuration, appended to eval.jsonl (resumable)."""

from __future__ import annotations

from typing import Iterable, Optional

from snexport.records import EvalResult


def top1(module, loader, device="cpu") -> tuple[float, int]:
    import torch

    correct = total = 0
    if hasattr(module, "eval"):
        module.eval()
    with torch.inference_mode():
        for x, y in loader:
            correct += int((module(x.to(device)).argmax(dim=1).cpu() == y).sum())
            total += len(y)
    return 100.0 * correct / max(total, 1), total


def evaluate_build(build, stitch_ids: Optional[Iterable[str]] = None, data: Optional[str] = None,
                   show_progress: bool = True, batch_size: int = 256) -> list[EvalResult]:
    """Evaluate the requested configurations (default: all); skips those already done for these weights."""
    from snexport.progress import progress_task

    plan = build.load_plan()
    wanted = [plan.get(i) for i in stitch_ids] if stitch_ids else list(plan.stitches)
    weights_hash = build.weights_hash()
    splits = None
    if build.accuracy_known:
        from snexport.data import open_data

        spec0 = plan.anchors[0]
        splits = open_data(data or build.info().get("data") or None, spec0.input_shape, spec0.num_classes,
                           batch_size=batch_size)
    dataset = splits.name if splits is not None else "unknown (random-init anchors)"
    # Reuse a result only for the same weights and the same dataset.
    done = {k: r for k, r in build.read_eval(weights_hash).items() if r.dataset == dataset}
    todo = [s for s in wanted if s.id not in done]
    results = {s.id: done[s.id] for s in wanted if s.id in done}
    if todo and splits is None:
        # Random-init anchors: accuracy is unknown, never a number (architecture-only build).
        for s in todo:
            rec = EvalResult(s.id, None, s.gflops, s.params, 0, dataset, weights_hash)
            build.append_eval(rec)
            results[s.id] = rec
    elif todo:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        net = build.load_snnet().to(device).eval()
        with progress_task("evaluating configurations", len(todo), show_progress) as advance:
            for s in todo:
                acc, n = top1(lambda x, sid=s.id: net(x, sid), splits.val, device)
                rec = EvalResult(s.id, round(acc, 3), s.gflops, s.params, n, splits.name, weights_hash)
                build.append_eval(rec)
                results[s.id] = rec
                advance()
    return sorted(results.values(), key=lambda r: (r.gflops, r.stitch_id))
