"""Runners against a tiny real timm ViT: ONNX Runtime and torch must agree with the module they came from."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")

from snexport.errors import BackendUnavailableError, BuildDirError, ProfileError, WeightsError  # noqa: E402
from snexport.device.runtime import Runner, backend_for_path, open_runner  # noqa: E402
from snexport.device.runtime.onnxruntime_runner import OnnxRuntimeRunner  # noqa: E402
from snexport.device.runtime.tensorrt_runner import TensorRTRunner, check_engine_version  # noqa: E402
from snexport.device.runtime.torch_runner import TorchRunner  # noqa: E402

INPUT_SHAPE = (1, 1, 8, 8)
HAS_CUDA = torch.cuda.is_available()


def _tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1, num_classes=10,
        embed_dim=32, depth=2, num_heads=2,
    ).eval()


@pytest.fixture(scope="module")
def vit():
    return _tiny_vit()


@pytest.fixture(scope="module")
def vit_onnx(vit, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "vit.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter from timm's shape checks, not a problem of ours
        torch.onnx.export(
            vit, torch.zeros(INPUT_SHAPE), str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"],
        )
    return path


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal(INPUT_SHAPE).astype(np.float32)


def _reference(vit, x):
    with torch.no_grad():
        return vit(torch.from_numpy(x)).numpy()


def _initializers(path):
    import onnx
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer}


# -- ONNX Runtime ------------------------------------------------------------------------------------------


def test_onnxruntime_matches_torch(vit, vit_onnx, x):
    runner = open_runner(vit_onnx, threads=1)
    assert isinstance(runner, Runner)
    assert runner.backend == "onnxruntime"
    assert (runner.input_name, runner.output_name) == ("input", "logits")
    assert runner.input_shape == INPUT_SHAPE and runner.input_dtype == "float32"
    np.testing.assert_allclose(runner.run(x), _reference(vit, x), rtol=1e-4, atol=1e-5)
    runner.close()
    assert runner.session is None


def test_onnxruntime_session_options_are_applied(vit_onnx):
    with OnnxRuntimeRunner(vit_onnx, threads=2, disable_prepacking=True, graph_optimization_level="basic") as r:
        opts = r.session.get_session_options()
        assert opts.intra_op_num_threads == 2
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"
        assert opts.get_session_config_entry("session.disable_prepacking") == "1"
        assert r.session.get_providers() == ["CPUExecutionProvider"]
        assert r.settings["intra_op_num_threads"] == 2 and r.settings["allow_spinning"] is False
    assert r.session is None  # the context manager closed it


def test_onnxruntime_casts_input_to_float16_model(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # A float16-input graph (what an FP16 export with FP16 I/O looks like): y = 2 * float(x).
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["xf", "two"], ["y"]),
        ],
        "half_in",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    path = tmp_path / "half.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with open_runner(path) as r:
        assert r.input_dtype == "float16"
        out = r.run(np.array([[0.5, 1.0, -3.0, 8.0]], dtype=np.float32))  # float32 in: must be cast, not refused
    np.testing.assert_array_equal(out, [[1.0, 2.0, -6.0, 16.0]])


def test_shared_initializer_overrides_embedded_weights(vit, vit_onnx, x):
    weights = _initializers(vit_onnx)
    zero_head = np.zeros_like(weights["head.weight"])
    with open_runner(vit_onnx, shared_initializers={"head.weight": zero_head}) as r:
        out = r.run(x)
    # With a zero classifier matrix the logits are exactly the bias: proof the session used our array.
    np.testing.assert_allclose(out, weights["head.bias"][None, :], atol=1e-6)
    assert not np.allclose(out, _reference(vit, x), atol=1e-3)


def test_shared_initializer_is_one_buffer_for_many_sessions(vit, vit_onnx, x, tmp_path):
    weights = _initializers(vit_onnx)
    np.save(tmp_path / "head.npy", weights["head.weight"])
    shared = np.load(tmp_path / "head.npy", mmap_mode="r+")  # the memmapped-weights use case
    a = open_runner(vit_onnx, shared_initializers={"head.weight": shared}, disable_prepacking=True)
    b = open_runner(vit_onnx, shared_initializers={"head.weight": shared}, disable_prepacking=True)
    before_a = a.run(x)
    b.run(x)
    np.testing.assert_allclose(before_a, _reference(vit, x), rtol=1e-4, atol=1e-5)
    shared[:] = 0.0  # one write to the caller's buffer...
    # ...is seen by both sessions: neither kept a private copy of the weights.
    np.testing.assert_allclose(a.run(x), weights["head.bias"][None, :], atol=1e-6)
    np.testing.assert_allclose(b.run(x), weights["head.bias"][None, :], atol=1e-6)
    a.close()
    b.close()


def test_shared_initializer_mismatches_are_refused(vit_onnx):
    weights = _initializers(vit_onnx)
    # ORT itself ignores unknown names silently and crashes on a wrong shape; we must refuse both first.
    with pytest.raises(WeightsError, match="not an initializer"):
        open_runner(vit_onnx, shared_initializers={"head.wieght": weights["head.weight"]})
    with pytest.raises(WeightsError, match="declares float32"):
        open_runner(vit_onnx, shared_initializers={"head.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(WeightsError, match="declares float32"):
        open_runner(vit_onnx, shared_initializers={"head.weight": weights["head.weight"].astype(np.float64)})


def test_onnxruntime_errors(vit_onnx, tmp_path):
    with pytest.raises(BuildDirError, match="no ONNX file"):
        open_runner(tmp_path / "missing.onnx")
    with pytest.raises(ProfileError, match="graph_optimization_level"):
        OnnxRuntimeRunner(vit_onnx, graph_optimization_level="max")


def test_onnxruntime_refuses_missing_provider(vit_onnx):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA EP, so the refusal path cannot be exercised")
    with pytest.raises(BackendUnavailableError, match="lacks CUDAExecutionProvider"):
        open_runner(vit_onnx, providers=["cuda"])


def test_backend_inferred_from_suffix(tmp_path):
    assert backend_for_path("a/b.onnx") == "onnxruntime"
    assert backend_for_path("b.ENGINE") == "tensorrt"
    assert backend_for_path("b.plan") == "tensorrt"
    with pytest.raises(BackendUnavailableError, match="pass backend="):
        backend_for_path("weights.safetensors")
    with pytest.raises(BackendUnavailableError, match="TorchRunner"):
        open_runner(tmp_path / "x.onnx", backend="torch")


# -- torch ---------------------------------------------------------------------------------------------------


def test_torch_runner_matches_module(vit, x):
    with TorchRunner(_tiny_vit(), INPUT_SHAPE) as r:
        assert isinstance(r, Runner) and r.backend == "torch" and r.input_shape == INPUT_SHAPE
        np.testing.assert_allclose(r.run(x), _reference(vit, x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.run(torch.from_numpy(x)), _reference(vit, x), rtol=1e-5, atol=1e-6)
        assert not r.module.training


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available, so the refusal path cannot be exercised")
def test_torch_runner_refuses_missing_cuda():
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        TorchRunner(_tiny_vit(), INPUT_SHAPE, device="cuda").load()


def test_torch_runner_cuda_graphs_need_cuda_device():
    with pytest.raises(BackendUnavailableError):
        TorchRunner(_tiny_vit(), INPUT_SHAPE, device="cpu", cuda_graphs=True).load()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_torch_runner_cuda_matches_cpu(vit, x, cuda_graphs):
    with TorchRunner(_tiny_vit(), INPUT_SHAPE, device="cuda", cuda_graphs=cuda_graphs) as r:
        np.testing.assert_allclose(r.run(x), _reference(vit, x), rtol=1e-3, atol=1e-4)
        x2 = x * 0.5  # a second, different input: a replayed graph must read the new data
        np.testing.assert_allclose(r.run(x2), _reference(vit, x2), rtol=1e-3, atol=1e-4)


# -- TensorRT --------------------------------------------------------------------------------------------------


def test_tensorrt_missing_is_a_clean_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed.*snexport bench"):
        open_runner(tmp_path / "stitch.engine")


def test_engine_version_check():
    check_engine_version("10.3.0.30", "10.3.0.26")  # same release, other build: accepted
    check_engine_version(None, "11.0.0")  # nothing recorded: nothing to check
    with pytest.raises(BackendUnavailableError, match="built with TensorRT 10.3.0 .* has 11.0.0.*rebuild"):
        check_engine_version("10.3.0", "11.0.0", "stitch.engine")
    with pytest.raises(BackendUnavailableError):
        check_engine_version("10.3.0", "10.7.0")


def test_tensorrt_runner_needs_cuda_python_not_torch(monkeypatch):
    """The TensorRT runner's buffers come from cuda-python; without it the error names the extra to install."""
    from snexport.device.runtime import tensorrt_runner

    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import raise ImportError
    with pytest.raises(BackendUnavailableError, match=r"cuda-python.*snexport\[tensorrt\]"):
        tensorrt_runner.import_cudart()


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_runner_matches_torch(vit, vit_onnx, x, tmp_path):
    from snexport.device.runtime.backends import runtime_available

    ok, why = runtime_available("tensorrt")  # tensorrt installed and a GPU that cuda-python sees
    if not ok:
        pytest.skip(why)
    trt = pytest.importorskip("tensorrt")
    pytest.importorskip("cuda", reason="the TensorRT runner needs cuda-python (pip install 'snexport[tensorrt]')")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(vit_onnx.read_bytes()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 28)
    engine_path = tmp_path / "vit.engine"
    engine_path.write_bytes(bytes(builder.build_serialized_network(network, config)))

    with open_runner(engine_path, expected_trt_version=trt.__version__) as r:
        assert (r.backend, r.input_name, r.output_name, r.input_shape) == ("tensorrt", "input", "logits", INPUT_SHAPE)
        np.testing.assert_allclose(r.run(x), _reference(vit, x), rtol=1e-3, atol=1e-3)
    with pytest.raises(BackendUnavailableError, match="rebuild"):
        open_runner(engine_path, expected_trt_version="1.0.0")
    assert isinstance(TensorRTRunner(engine_path), Runner)


# -- import hygiene ------------------------------------------------------------------------------------------


def test_importing_runtime_pulls_in_no_runtime():
    code = (
        "import sys, snexport.device.runtime\n"
        "heavy = [m for m in ('torch', 'numpy', 'onnxruntime', 'tensorrt', 'onnx') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing snexport.device.runtime imported {out}"
