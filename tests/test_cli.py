"""The command line as a user meets it: help without heavy imports, JSON output, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "timm", "numpy", "onnx", "onnxruntime")


def run_cli(*args, timeout=300):
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "snexport.cli.app", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_import_and_help_stay_light():
    code = ("import sys, snexport, snexport.cli.app as a\n"
            "from typer.main import get_command\n"
            "get_command(a.app)\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    proc = run_cli("--help")
    assert proc.returncode == 0 and "plan" in proc.stdout and "stitch" in proc.stdout


def test_plan_json_counts():
    proc = run_cli("plan", "--anchors", "deit_ti,deit_s,deit_b", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert len(doc["anchors"]) + len(doc["stitches"]) == 71 and doc["num_layers"] == 22
    assert [a["gflops"] for a in doc["anchors"]] == [1.258, 4.608, 17.583]
    s = doc["stitches"][0]
    # The issue-2 shape, plus the route as hops and both params conventions (SN-Netv2 routes).
    assert set(s) == {"id", "front", "back", "stage", "cut", "resume", "layer", "blocks", "gflops", "params",
                      "route", "layers", "params_module", "params_paper"}
    assert s["layers"] == [s["layer"]] and len(s["route"]) == 2
    assert s["stage"] == 0  # a plain ViT has one stage
    assert s["id"] == f"{s['front']}:{s['cut']}>{s['back']}:{s['resume']}"


@pytest.mark.parametrize(
    "args,needle",
    [
        (("plan", "--anchors", "deit_s,deit_bb"), "unknown model 'deit_bb'"),
        (("plan", "--anchors", "deit_s,deit_b384"), "image size differs"),
        (("evaluate", "/nonexistent/build"), "does not exist"),
        (("stitch", "--anchors", "deit_s,deit_b", "--out", "/tmp/snx-never", "--weights", "deit_s"), "NAME=PATH"),
    ],
)
def test_bad_input_is_one_red_line(args, needle):
    proc = run_cli(*args)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr
