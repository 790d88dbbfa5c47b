"""Device profiles: every shipped profile loads, names resolve, and malformed files fail loudly."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from snexport.device import profiles as device_profiles
from snexport.device.profiles import (
    HardwareFacts,
    MeasurementSettings,
    list_profiles,
    load_profile,
)
from snexport.errors import ProfileError

SHIPPED = ["cuda-gpu", "jetson-orin-agx", "jetson-orin-nano", "jetson-orin-nx", "x86-cpu"]

VALID = """
description = "test box"
backend = "onnxruntime"
precision = "fp32"
threads = 2

[measurement]
warmup = 1
iterations = 5
min_duration_s = 0
max_duration_s = 1.5
percentiles = [50, 99.9]
"""


def _write(tmp_path: Path, text: str, name: str = "box.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_list_profiles():
    assert list_profiles() == SHIPPED
    assert "jetson-orin" in list_profiles(include_aliases=True)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_load(name):
    profile = load_profile(name)
    assert profile.name == name and profile.description
    assert profile.backend in device_profiles.BACKENDS and profile.precision in device_profiles.PRECISIONS
    m = profile.measurement
    assert m.iterations >= 1 and m.max_duration_s >= m.min_duration_s and m.percentiles
    json.loads(json.dumps(profile.to_dict()))
    if name.startswith("jetson"):
        hw = profile.hardware
        assert hw.compute_capability == "8.7" and hw.unified_memory is True
        assert hw.sm_count and hw.memory_bandwidth_gbs and "power_mode" in profile.record
        assert profile.backend == "tensorrt" and profile.workspace_mb


def test_jetson_table_facts():
    agx, nx, nano = (load_profile(n).hardware for n in ("jetson-orin-agx", "jetson-orin-nx", "jetson-orin-nano"))
    agx_facts = (agx.cuda_cores, agx.sm_count, agx.dla_cores, agx.memory_gb, agx.memory_bandwidth_gbs)
    assert agx_facts == (2048, 16, 2, 64, 204.8)
    assert (nx.cuda_cores, nx.sm_count, nx.memory_gb, nx.memory_bandwidth_gbs) == (1024, 8, 16, 102.4)
    assert (nano.sm_count, nano.dla_cores, nano.memory_gb, nano.memory_bandwidth_gbs) == (8, 0, 8, 68.0)


def test_alias_is_agx():
    assert load_profile("jetson-orin") == load_profile("jetson-orin-agx")


def test_load_by_path_and_runner_options(tmp_path):
    profile = load_profile(_write(tmp_path, VALID))
    assert profile.name == "box" and profile.threads == 2
    assert profile.measurement == MeasurementSettings(1, 5, 0.0, 1.5, (50.0, 99.9))
    assert profile.runner_options() == {"providers": ["cpu"], "threads": 2}
    assert profile.source == str(tmp_path / "box.toml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.threads = 3  # type: ignore[misc]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ProfileError) as err:
        load_profile("jetson-orin-agz")
    message = str(err.value)
    assert "jetson-orin-agz" in message and "Did you mean jetson-orin-agx" in message
    for name in SHIPPED + ["jetson-orin"]:
        assert name in message


@pytest.mark.parametrize(
    "text, key",
    [
        ("workspace_mbb = 10\n" + VALID, "'workspace_mbb'"),
        (VALID.replace("warmup = 1", "warmpu = 1"), "'measurement.warmpu'"),
        (VALID + "\n[hardware]\nsm_cont = 8\n", "'hardware.sm_cont'"),
    ],
)
def test_unknown_key_names_key_and_file(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert key in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    "old, new, field",
    [
        ('threads = 2', 'threads = "2"', "'threads'"),
        ('threads = 2', 'threads = true', "'threads'"),  # bool is an int in Python; must not pass as 1
        ('iterations = 5', 'iterations = 5.5', "'measurement.iterations'"),
        ('percentiles = [50, 99.9]', 'percentiles = [50, "p99"]', "'measurement.percentiles[1]'"),
        ('percentiles = [50, 99.9]', 'percentiles = [50, 120]', "'measurement.percentiles[1]'"),
        ('backend = "onnxruntime"', 'backend = "tflite"', "'backend'"),
        ('precision = "fp32"', 'precision = "int8"', "'precision'"),
        ('threads = 2', 'threads = 0', "'threads'"),
        ('max_duration_s = 1.5', 'max_duration_s = -1.0', "'measurement.max_duration_s'"),
    ],
)
def test_wrong_values_name_the_field(tmp_path, old, new, field):
    assert old in VALID
    with pytest.raises(ProfileError) as err:
        load_profile(_write(tmp_path, VALID.replace(old, new)))
    assert field in str(err.value)


def test_missing_required_key_and_bad_toml(tmp_path):
    with pytest.raises(ProfileError, match="backend"):
        load_profile(_write(tmp_path, VALID.replace('backend = "onnxruntime"', "")))
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(_write(tmp_path, "description = ", "broken.toml"))
    with pytest.raises(ProfileError, match="no profile file"):
        load_profile(tmp_path / "absent.toml")


def test_schema_tables_match_dataclasses():
    # The key tables drive validation; a field added to a dataclass but not to its table would be unreachable.
    assert set(device_profiles._MEASUREMENT) == {f.name for f in dataclasses.fields(MeasurementSettings)}
    assert set(device_profiles._HARDWARE) == {f.name for f in dataclasses.fields(HardwareFacts)}


def test_installed_wheel_location_searched_first(tmp_path, monkeypatch):
    package_dir = Path(device_profiles.__file__).resolve().parent.parent  # snexport/
    assert device_profiles._search_dirs() == [package_dir / "_profiles", package_dir.parent / "profiles"]
    # A wheel's copy wins over a checkout's copy of the same name.
    wheel, repo = tmp_path / "_profiles", tmp_path / "profiles"
    wheel.mkdir()
    repo.mkdir()
    _write(wheel, VALID.replace("test box", "from wheel"), "box.toml")
    _write(repo, VALID.replace("test box", "from repo"), "box.toml")
    _write(repo, VALID, "other.toml")
    monkeypatch.setattr(device_profiles, "_search_dirs", lambda: [wheel, repo])
    assert load_profile("box").description == "from wheel"
    assert list_profiles() == ["box", "other"]


def test_importing_device_profiles_is_light():
    code = (
        "import sys, snexport.device.profiles as d\n"
        "d.load_profile('x86-cpu')\n"
        "print(','.join(m for m in ('torch', 'numpy', 'onnxruntime') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
