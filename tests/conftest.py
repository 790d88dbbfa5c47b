"""Shared fixtures: tiny real anchors through the real timm code path, and a cached demo family.

The demo family is trained once per checkout into .pytest_cache/snexport (not the user's cache), so the first
test run pays ~30 s and later runs start at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("SNEXPORT_CACHE", str(REPO / ".pytest_cache" / "snexport"))

DEMO = ["demo_s", "demo_m", "demo_l"]


@pytest.fixture(scope="session")
def demo_plan():
    from snexport.families.registry import describe_anchors
    from snexport.stitching.plan import plan_stitches

    return plan_stitches(describe_anchors(DEMO))


@pytest.fixture(scope="session")
def random_snnet(demo_plan):
    """The demo architecture with random weights (structure tests need no training)."""
    from snexport.families.registry import load_anchor
    from snexport.stitching.snnet import SNNet

    return SNNet(demo_plan, [load_anchor(n, random_init=True, seed=i) for i, n in enumerate(DEMO)]).eval()


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory):
    """A least-squares-initialised build of the trained demo family (trains the anchors on first use)."""
    from snexport.stitching.stage import stitch_stage

    build, _ = stitch_stage(tmp_path_factory.mktemp("demo") / "build", DEMO, show_progress=False)
    return build
