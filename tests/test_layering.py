"""The tree's two halves and its stage order, checked on the source (every import, also those inside functions).

- base (errors, records, hashing, progress, buildfiles) imports only the standard library and itself;
- the device half (snexport/device) imports only the base and itself, and of third-party packages only the
  runtimes it drives (torch only in the torch runner and the GPU probe, matplotlib only in the report);
- a host stage imports the base, the device half and earlier stages, never a later one;
- no import cycle anywhere.
A violation names the file, the line and the import, so the fix is obvious.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "snexport"

BASE = {"snexport", "snexport.errors", "snexport.records", "snexport.hashing", "snexport.progress",
        "snexport.buildfiles"}
# Host stages in data-flow order; a stage may import itself and anything before it.
STAGES = ["data", "families", "stitching", "training", "evaluation", "selection", "export", "experimental",
          "pipeline", "cli"]
DEVICE_THIRD_PARTY = {"numpy", "onnxruntime", "tensorrt", "cuda", "pynvml", "openvino", "rich", "typer", "psutil",
                      "tomli"}
# Imports of the device half that are allowed in one module only, with the reason.
DEVICE_EXCEPTIONS = {
    "torch": {"snexport.device.runtime.torch_runner",  # the torch backend runs PyTorch modules by definition
              "snexport.device.runtime.backends"},  # asks torch for GPUs only where torch is installed (a host)
    "matplotlib": {"snexport.device.report"},  # the plot is drawn where matplotlib is present, skipped otherwise
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            # `from snexport.x import y` where y is a submodule imports snexport.x.y
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                if _is_module(candidate):
                    out.append((node.lineno, candidate))
    return out


def _is_module(name: str) -> bool:
    if not name.startswith("snexport"):
        return False
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _place(module: str) -> tuple[str, int]:
    """('base'|'device'|'stage', stage rank)."""
    if module in BASE:
        return "base", -1
    part = module.split(".")[1]
    if part == "device":
        return "device", -1
    if part in STAGES:
        return "stage", STAGES.index(part)
    raise AssertionError(f"{module} is in no layer: put it in the base, the device half or a stage folder")


def test_every_module_has_a_place():
    for module in _modules():
        _place(module)


def test_no_upward_or_cross_half_imports():
    problems = []
    stdlib = set(sys.stdlib_module_names)
    for module, path in _modules().items():
        kind, rank = _place(module)
        for line, imported in _imports(path):
            top = imported.split(".")[0]
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}"
            if top == "snexport":
                if imported == "snexport" or imported in BASE:
                    continue
                target_kind, target_rank = _place(imported)
                if kind == "base":
                    problems.append(f"{where}: the base imports nothing of either half")
                elif kind == "device" and target_kind != "device":
                    problems.append(f"{where}: the device half never imports the host half")
                elif kind == "stage" and target_kind == "stage" and target_rank > rank:
                    problems.append(f"{where}: stage {STAGES[rank]} imports the later stage {STAGES[target_rank]}")
            elif kind in ("base", "device") and top not in stdlib and top != "__future__":
                if module in DEVICE_EXCEPTIONS.get(top, ()):
                    continue
                if kind == "device" and top in DEVICE_THIRD_PARTY:
                    continue
                if kind == "base" and top == "rich" and module == "snexport.progress":
                    continue  # progress bars: rich is a dependency of the CLI on both halves
                problems.append(f"{where}: the {kind} half may import only the standard library and its runtimes")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    modules = _modules()
    graph = {m: sorted({i for _, i in _imports(p) if i in modules and i != m}) for m, p in modules.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle between modules of different places.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if nxt.startswith(node + "."):  # a package importing its own submodule
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                if not all(c.startswith(nxt + ".") or c == nxt or nxt.startswith(c + ".") for c in cycle):
                    pytest.fail("import cycle: " + " -> ".join(cycle))
            elif state.get(nxt) is None:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module)


def test_build_directory_names_have_one_owner():
    """Every build-directory file name is spelled in snexport/buildfiles.py and nowhere else in the package."""
    names = ['"plan.json"', '"snnet.safetensors"', '"eval.jsonl"', '"exports.json"', '"deploy.json"',
             '"engines.json"', '"profile.jsonl"', '"manifest.json"', '"candidates.json"', '"pack.json"',
             '"state.pt"', '"init.safetensors"', '"log.jsonl"']
    offenders = []
    for module, path in _modules().items():
        if module == "snexport.buildfiles":
            continue
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(PACKAGE.parent)}: {n}" for n in names if n in text]
    assert not offenders, "\n".join(offenders)
