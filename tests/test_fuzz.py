"""Seeded fuzz of what a build directory brings from another machine (issue 8): the manifest into the selector,
device profiles, and the JSON/JSONL files the select, export and bench readers take.

Every outcome must be a success or a SnexportError subclass, and no case may hang (each runs in a worker process
with a per-case timeout). The harness is benchmarks/fuzz_manifest.py, which runs 10,000 cases and prints the
counts; here a few hundred cases of another seed keep the suite at ~20 s.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _harness():
    spec = importlib.util.spec_from_file_location("fuzz_manifest", REPO / "benchmarks" / "fuzz_manifest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory, demo_plan):
    fm = _harness()
    base = tmp_path_factory.mktemp("fuzz-base")
    fm.make_base(base, dict(demo_plan.to_dict(), hash=demo_plan.hash))
    return fm, base


def test_base_directory_is_valid_so_the_fuzz_is_not_vacuous(fuzz_base):
    """Unmutated, every reader succeeds: the errors the fuzz sees come from its mutations."""
    fm, base = fuzz_base
    for target in fm.TARGETS:
        case = {"target": target, "ops": [{"op": "selector", "mode": "preload", "candidates": None},
                                          {"op": "switch", "id": "demo_m"}]}
        result = fm.run_case(base, case)
        assert result["outcome"] == "ok", (target, result)


def test_mutated_inputs_give_success_or_a_typed_error_and_never_hang(fuzz_base):
    fm, base = fuzz_base
    result = fm.run_campaign(base, cases=240, seed=8, timeout=20.0)
    counts = result["counts"]
    assert result["untyped"] == {}, json.dumps(result["failures"][:10], indent=1)
    assert all(c.get("hang", 0) == 0 for c in counts.values()), result["failures"]
    assert result["typed_not_one_line"] == 0
    # Both kinds of outcome occur for every target and for the selector's calls (a case makes several, so whole
    # manifest cases rarely all succeed): a harness whose cases all fail the same way would pass the assertions
    # above without testing anything.
    for outcomes in (counts["profile"], counts["buildfiles"], result["steps"]["manifest/Selector"],
                     result["steps"]["manifest/choose"], result["steps"]["manifest/switch"]):
        assert outcomes.get("ok", 0) > 0 and outcomes.get("typed", 0) > 0, result["steps"]
