"""snexport.device.onnxproto (the device's standard-library ONNX reader/writer), cross-checked against the real
onnx / protobuf / onnxruntime packages, which the test environment has and a device does not."""

import os
import random
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from snexport.device import onnxproto as op
from snexport.device.onnxproto import WT_I32, WT_I64, WT_LEN, WT_SGROUP, WT_VARINT, Message, OnnxFormatError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------
# Reference models
# --------------------------------------------------------------------------

def _matmul_model():
    """X[2,4] -> MatMul(W) -> Add(B) -> Reshape(S) -> Y.  W is stored as
    raw_data, B as float_data and S as int64_data (typed fields)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    W = numpy_helper.from_array(w, "W")  # raw_data
    B = helper.make_tensor("B", TensorProto.FLOAT, [3], b.tolist())  # float_data
    S = helper.make_tensor("S", TensorProto.INT64, [2], [3, 2])  # int64_data
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "B"], ["add"], name="add"),
        helper.make_node("Reshape", ["add", "S"], ["Y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, 2])],
        initializer=[W, B, S],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="onnxproto-test")
    model.ir_version = 8
    helper.set_model_props(model, {"author": "test", "snexport.version": "0"})
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    out = {}

    p = d / "matmul.onnx"
    onnx.save(_matmul_model(), str(p))
    out["matmul"] = str(p)

    ext_dir = d / "ext"
    ext_dir.mkdir()
    p = ext_dir / "matmul_ext.onnx"
    onnx.save(_matmul_model(), str(p), save_as_external_data=True,
              all_tensors_to_one_file=True, location="matmul_ext.data", size_threshold=0)
    out["external"] = str(p)

    import timm
    import torch

    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    p = d / "vit.onnx"
    torch.onnx.export(vit, (torch.randn(1, 3, 32, 32),), str(p), dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}})
    out["vit"] = str(p)
    return out


ALL = ["matmul", "external", "vit"]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _walk(model):
    """Descend into everything the typed API exposes (forces lazy decoding)."""
    model.ir_version, model.producer_name, model.opset_import, model.metadata
    g = model.graph
    g.name
    g.op_types()
    for n in g.nodes:
        n.name, n.inputs, n.outputs
    for t in g.initializers:
        t.name, t.dims, t.data_type, t.data_location, t.external_entries, t.raw_data, t.has_typed_data
    for v in g.inputs + g.outputs:
        v.name, v.elem_type, v.shape
    op.initializer_infos(model)
    op.io_info(model)


def _session(path_or_bytes):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def _feed(path):
    if "vit" in os.path.basename(path):
        return {"x": np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    return {"X": np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)}


# --------------------------------------------------------------------------
# Stdlib only
# --------------------------------------------------------------------------

def test_module_imports_only_stdlib():
    # -S: no site-packages at all, so any numpy/onnx/protobuf import would fail.
    code = (
        "import sys; before = set(sys.modules); sys.path.insert(0, %r); import snexport.device.onnxproto; "
        "new = sorted({m.split('.')[0] for m in set(sys.modules) - before}); print(' '.join(new))"
        % REPO)
    res = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    new = set(res.stdout.split())
    assert "snexport" in new
    assert not new & {"onnx", "google", "numpy", "onnxruntime"}
    non_std = new - set(sys.stdlib_module_names) - {"snexport"}
    assert not non_std, non_std


# --------------------------------------------------------------------------
# Generic wire format
# --------------------------------------------------------------------------

def test_generic_fields_all_wire_types():
    data = (
        bytes([0x08, 0x96, 0x01])                        # 1: varint 150
        + bytes([0x10]) + b"\xff" * 9 + b"\x01"           # 2: varint -1 (10 bytes)
        + bytes([0x19]) + (2 ** 64 - 2).to_bytes(8, "little")  # 3: fixed64
        + bytes([0x25]) + (0x3F800000).to_bytes(4, "little")   # 4: fixed32 (1.0f)
        + bytes([0x2A, 0x03]) + b"abc"                    # 5: bytes
        + bytes([0x33, 0x08, 0x07, 0x34])                 # 6: group {1: 7}
        + bytes([0xF8, 0xFF, 0xFF, 0xFF, 0x0F, 0x05])     # 2^29-1: varint 5
    )
    fields = op.decode_fields(data)
    got = [tuple(f)[:2] + ((f.value if isinstance(f.value, int) else bytes(f.value)),) for f in fields]
    assert got == [
        (1, WT_VARINT, 150), (2, WT_VARINT, 2 ** 64 - 1), (3, WT_I64, 2 ** 64 - 2),
        (4, WT_I32, 0x3F800000), (5, WT_LEN, b"abc"), (6, WT_SGROUP, b"\x08\x07"),
        (2 ** 29 - 1, WT_VARINT, 5),
    ]
    assert op.encode_fields(fields) == data
    m = Message(data)
    assert m.get_int(2) == -1 and m.get_int(2, signed=False) == 2 ** 64 - 1
    assert m.to_bytes() == data and m.to_bytes(reuse=False) == data
    m.touch()
    assert m.to_bytes() == data


def test_unchanged_fields_keep_noncanonical_bytes():
    # Field 1 uses an over-long varint (3 bytes for the value 1); editing
    # field 2 must not canonicalize field 1.
    data = bytes([0x08, 0x81, 0x80, 0x00, 0x12, 0x01]) + b"x"
    m = Message(data)
    assert m.get_int(1) == 1
    m.set(2, WT_LEN, "yz")
    assert m.to_bytes() == bytes([0x08, 0x81, 0x80, 0x00, 0x12, 0x02]) + b"yz"
    assert m.to_bytes(reuse=False) == bytes([0x08, 0x01, 0x12, 0x02]) + b"yz"


def test_set_add_remove_keep_field_number_order():
    m = Message(bytes([0x08, 0x01, 0x28, 0x05]))  # fields 1 and 5
    m.add(3, WT_VARINT, 3)
    m.add(9, WT_VARINT, 9)
    m.set(5, WT_VARINT, -2)
    assert [f.number for f in m.fields] == [1, 3, 5, 9]
    assert m.get_int(5) == -2
    assert m.remove(3) == 1 and m.remove(3) == 0
    assert Message(m.to_bytes()).get_int(5) == -2


@pytest.mark.parametrize("name", ALL)
def test_round_trip_byte_identical(models, name):
    data = _read(models[name])
    m = op.parse_model(data)
    assert m.to_bytes() == data
    _walk(m)
    # Cached fast path, then a full re-encode of every decoded level from
    # parsed values (proves the encoder, not just the byte cache).
    assert m.to_bytes() == data
    assert m.msg.to_bytes(reuse=False) == data
    out = os.path.join(os.path.dirname(models[name]), "rt_" + os.path.basename(models[name]))
    op.read_model(models[name]).save(out)
    assert _read(out) == data


@pytest.mark.parametrize("name", ALL)
def test_touching_every_message_still_identical(models, name):
    data = _read(models[name])
    m = op.parse_model(data)
    g = m.graph
    for t in g.initializers:
        t.msg.touch()
    for v in g.inputs + g.outputs:
        v.msg.touch()
        v.msg.get_message(2).touch()
    g.msg.touch()
    m.msg.touch()
    assert m.to_bytes() == data


# --------------------------------------------------------------------------
# Typed reading vs onnx
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_initializer_infos_match_onnx(models, name):
    ref = onnx.load(models[name], load_external_data=False)
    infos = op.initializer_infos(models[name])
    assert list(infos) == [t.name for t in ref.graph.initializer]
    for t in ref.graph.initializer:
        info = infos[t.name]
        ext = {e.key: e.value for e in t.external_data}
        assert info["dims"] == list(t.dims)
        assert info["data_type"] == t.data_type
        assert info["data_location"] == t.data_location
        assert info["location"] == ext.get("location")
        assert info["offset"] == (int(ext["offset"]) if "offset" in ext else None)
        assert info["length"] == (int(ext["length"]) if "length" in ext else None)
        assert info["extra"] == {k: v for k, v in ext.items() if k not in ("location", "offset", "length")}
        assert info["embedded_bytes"] == (len(t.raw_data) if t.HasField("raw_data") else None)
    if name == "external":
        # onnx.save only externalizes raw_data tensors; typed-field ones stay.
        assert (infos["W"]["data_location"], infos["W"]["location"]) == (1, "matmul_ext.data")
        assert infos["B"]["data_location"] == infos["S"]["data_location"] == 0


def test_initializer_infos_never_opens_external_file(models, tmp_path):
    src = models["external"]
    dst = tmp_path / "m.onnx"
    shutil.copy(src, dst)  # copy only the graph, not matmul_ext.data
    infos = op.initializer_infos(str(dst))
    assert infos["W"]["location"] == "matmul_ext.data" and infos["W"]["length"] == 48


@pytest.mark.parametrize("name", ALL)
def test_model_fields_and_io_info_match_onnx(models, name):
    ref = onnx.load(models[name], load_external_data=False)
    m = op.read_model(models[name])
    assert m.ir_version == ref.ir_version
    assert m.producer_name == ref.producer_name
    assert m.producer_version == ref.producer_version
    assert m.opset_import == {o.domain: o.version for o in ref.opset_import}
    assert m.metadata == {p.key: p.value for p in ref.metadata_props}
    assert op.metadata(models[name]) == m.metadata
    assert m.graph.op_types() == [(n.domain, n.op_type) for n in ref.graph.node]
    assert [n.inputs for n in m.graph.nodes] == [list(n.input) for n in ref.graph.node]
    assert [n.outputs for n in m.graph.nodes] == [list(n.output) for n in ref.graph.node]

    def ref_vi(v):
        tt = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None
                 for d in tt.shape.dim]
        return {"name": v.name, "elem_type": tt.elem_type,
                "dtype": str(helper.tensor_dtype_to_np_dtype(tt.elem_type)), "shape": shape}

    io = op.io_info(models[name])
    assert io["outputs"] == [ref_vi(v) for v in ref.graph.output]
    assert io["inputs"] == [ref_vi(v) for v in ref.graph.input]
    sess = _session(models[name])
    assert [i["name"] for i in io["inputs"]] == [i.name for i in sess.get_inputs()]
    if name == "vit":
        assert io["inputs"][0]["shape"] == ["batch", 3, 32, 32]


def test_io_info_skips_initializer_inputs_of_old_ir(tmp_path):
    model = _matmul_model()
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3]))
    p = str(tmp_path / "old.onnx")
    onnx.save(model, p)
    assert [i["name"] for i in op.io_info(p)["inputs"]] == ["X"]
    assert [i["name"] for i in op.io_info(p, include_initializers=True)["inputs"]] == ["X", "W"]


def test_typed_data_presence(models):
    g = op.read_model(models["matmul"]).graph
    w, b, s = (g.initializer(n) for n in "WBS")
    assert w.raw_data is not None and not w.has_typed_data
    assert b.raw_data is None and b.has_typed_data
    assert s.raw_data is None and s.has_typed_data
    assert bytes(w.raw_data) == numpy_helper.to_array(onnx.load(models["matmul"]).graph.initializer[0]).tobytes()
    assert g.initializer("nope") is None


def test_dtype_map_matches_onnx():
    for dt, name in op.ONNX_TO_NUMPY.items():
        if name is None:
            continue
        assert np.dtype(helper.tensor_dtype_to_np_dtype(dt)) == np.dtype(name), dt
        if dt in op.ELEMENT_SIZE:
            assert np.dtype(name).itemsize == op.ELEMENT_SIZE[dt]
    assert op.numpy_dtype_name(TensorProto.BFLOAT16) is None
    assert op.ELEMENT_SIZE[TensorProto.BFLOAT16] == 2
    assert (op.numpy_dtype_name(1), op.numpy_dtype_name(10), op.numpy_dtype_name(11)) == \
        ("float32", "float16", "float64")


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32",
                                   "int64", "uint32", "uint64", "bool", "complex64"])
def test_data_bytes_of_typed_fields_match_numpy(dtype):
    """Exporters keep small constants in float_data/int32_data/...: data_bytes gives what raw_data would hold."""
    rng = np.random.default_rng(3)
    values = (rng.standard_normal((2, 3)) * 100).astype(dtype)
    if dtype == "complex64":
        values = values + 1j * values[::-1]
    typed = helper.make_tensor("t", helper.np_dtype_to_tensor_dtype(values.dtype), values.shape,
                               values.flatten().tolist())
    assert not typed.HasField("raw_data")
    t = op.Tensor(Message(typed.SerializeToString()))
    assert bytes(t.data_bytes()) == numpy_helper.to_array(typed).tobytes() == values.tobytes()
    raw = numpy_helper.from_array(values, "r")  # raw_data: returned as the zero-copy view
    assert bytes(op.Tensor(Message(raw.SerializeToString())).data_bytes()) == values.tobytes()


def test_data_bytes_refuses_what_it_cannot_lay_out():
    strings = helper.make_tensor("s", TensorProto.STRING, [1], [b"x"])
    with pytest.raises(OnnxFormatError, match="no fixed-size element layout"):
        op.Tensor(Message(strings.SerializeToString())).data_bytes()
    short = helper.make_tensor("f", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])
    del short.dims[:]
    short.dims.extend([4])
    with pytest.raises(OnnxFormatError, match="need 16"):
        op.Tensor(Message(short.SerializeToString())).data_bytes()
    ext = helper.make_tensor("e", TensorProto.FLOAT, [1], [0.0])
    ext.ClearField("float_data")
    ext.data_location = TensorProto.EXTERNAL
    with pytest.raises(OnnxFormatError, match="external file"):
        op.Tensor(Message(ext.SerializeToString())).data_bytes()


def test_packed_and_unpacked_dims():
    ref = helper.make_tensor("t", TensorProto.FLOAT, [2, 0, 300, 70000], [])
    unpacked = ref.SerializeToString()  # proto2 `repeated int64 dims` is unpacked
    m = Message(unpacked)
    assert all(f.wire_type == WT_VARINT for f in m.all(1))
    assert op.Tensor(m).dims == [2, 0, 300, 70000]

    # Re-encode the same tensor with packed dims: one LEN field of varints.
    packed = Message(unpacked)
    dims = packed.get_ints(1)
    packed.remove(1)
    packed.add(1, WT_LEN, b"".join(op._varint(d) for d in dims))
    data = packed.to_bytes()
    assert len(Message(data).all(1)) == 1 and Message(data).all(1)[0].wire_type == WT_LEN
    assert op.Tensor(Message(data)).dims == [2, 0, 300, 70000]
    t2 = TensorProto()
    t2.ParseFromString(data)  # protobuf itself agrees on the packed form
    assert list(t2.dims) == [2, 0, 300, 70000]

    # Mixed packed + unpacked occurrences concatenate, negatives are int64.
    mixed = Message(bytes([0x08, 0x05, 0x0A, 0x02, 0x06, 0x07]) + bytes([0x08]) + b"\xff" * 9 + b"\x01")
    assert op.Tensor(mixed).dims == [5, 6, 7, -1]


# --------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------

def _externalize(src, dst_dir, location="weights.bin", align=64, extra=None, keep=()):
    """Pack initializers (except `keep`) into one .bin using only onnxproto
    for the model side; numpy (test-only) converts typed-field tensors."""
    ref = {t.name: t for t in onnx.load(src).graph.initializer}
    model = op.read_model(src)
    layout = {}
    with open(os.path.join(dst_dir, location), "wb") as f:
        f.write(b"HDR")  # deliberately unaligned start
        for t in model.graph.initializers:
            if t.name in keep:
                continue
            raw = t.raw_data
            blob = bytes(raw) if raw is not None else numpy_helper.to_array(ref[t.name]).tobytes()
            if raw is not None:
                assert blob == numpy_helper.to_array(ref[t.name]).tobytes()
            pos = f.tell()
            pad = (-pos) % align
            f.write(b"\xAA" * pad + blob + b"\x55" * 5)  # gaps prove offsets are used
            offset = pos + pad
            t.set_external_data(location, offset, len(blob), extra or ())
            layout[t.name] = (offset, len(blob))
    out = os.path.join(dst_dir, "packed.onnx")
    model.save(out)
    return out, layout


@pytest.mark.parametrize("name", ["matmul", "vit"])
def test_externalized_model_checks_and_runs_bitwise(models, tmp_path, name):
    # onnxruntime's shape inference cannot read a Reshape shape tensor from
    # external data, so (like onnx.save's size_threshold) keep S embedded.
    out, layout = _externalize(models[name], str(tmp_path), keep={"S"})
    assert set(layout) == ({"W", "B"} if name == "matmul" else set(layout))
    onnx.checker.check_model(out)  # path form: also validates external files
    loaded = onnx.load(out)  # loads external data
    orig = onnx.load(models[name])
    for a, b in zip(orig.graph.initializer, loaded.graph.initializer):
        assert numpy_helper.to_array(a).tobytes() == numpy_helper.to_array(b).tobytes()
    infos = op.initializer_infos(out)
    for n, (off, ln) in layout.items():
        i = infos[n]
        assert (i["location"], i["offset"], i["length"], i["data_location"], i["embedded_bytes"]) == \
            ("weights.bin", off, ln, 1, None)
    feed = _feed(models[name])
    want = _session(models[name]).run(None, feed)
    got = _session(out).run(None, feed)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and w.shape == g.shape
        assert w.tobytes() == g.tobytes()


def test_externalize_bytes_equal_protobuf_serialization(models, tmp_path):
    # Doing the same edit with the official protobuf API must give the exact
    # same bytes: proves field order and all re-encoded lengths up the tree.
    out, layout = _externalize(models["vit"], str(tmp_path))
    ref = onnx.load(models["vit"])
    for t in ref.graph.initializer:
        off, ln = layout[t.name]
        t.ClearField("raw_data")
        for fld in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            t.ClearField(fld)
        for k, v in (("location", "weights.bin"), ("offset", str(off)), ("length", str(ln))):
            e = t.external_data.add()
            e.key, e.value = k, v
        t.data_location = TensorProto.EXTERNAL
    assert _read(out) == ref.SerializeToString()


def test_extra_external_keys_and_replacement(models, tmp_path):
    src = models["external"]
    model = op.read_model(src)
    w = model.graph.initializer("W")
    old = dict(w.external_data)
    extra = {"checksum": "abc", "prepacked_test": "0;1"}
    w.set_external_data(old["location"], int(old["offset"]), int(old["length"]), extra)
    out = os.path.join(os.path.dirname(src), "extra.onnx")
    model.save(out)
    ref = onnx.load(out, load_external_data=False)
    t = [t for t in ref.graph.initializer if t.name == "W"][0]
    assert [(e.key, e.value) for e in t.external_data] == [
        ("location", old["location"]), ("offset", old["offset"]), ("length", old["length"]),
        ("checksum", "abc"), ("prepacked_test", "0;1")]
    assert op.initializer_infos(out)["W"]["extra"] == extra
    # Replacing external entries again leaves no stale entries behind.
    m2 = op.read_model(out)
    m2.graph.initializer("W").set_external_entries([("location", old["location"])])
    assert [(e.key, e.value) for e in [x for x in onnx.load_from_string(m2.to_bytes()).graph.initializer
                                       if x.name == "W"][0].external_data] == [("location", old["location"])]


def test_set_external_data_validates_arguments(models):
    t = op.read_model(models["matmul"]).graph.initializer("W")
    with pytest.raises(ValueError):
        t.set_external_data("", 0, 4)
    with pytest.raises(ValueError):
        t.set_external_data("w.bin", -1, 4)
    with pytest.raises(TypeError):
        t.set_external_data("w.bin", 0, 4, {"k": 1})


def test_metadata_add_and_replace(models, tmp_path):
    src = models["matmul"]
    model = op.read_model(src)
    model.set_metadata("snexport.version", "1.2.3")  # replace existing
    model.set_metadata("snexport.packed", "weights.bin")  # add new
    model.set_metadata("ünïcode", "värde")
    out = str(tmp_path / "meta.onnx")
    model.save(out)
    ref = onnx.load(out)
    assert [(p.key, p.value) for p in ref.metadata_props] == [
        ("author", "test"), ("snexport.version", "1.2.3"),
        ("snexport.packed", "weights.bin"), ("ünïcode", "värde")]
    assert op.metadata(out) == {p.key: p.value for p in ref.metadata_props}
    onnx.checker.check_model(out)

    expect = onnx.load(src)
    expect.metadata_props[1].value = "1.2.3"
    for k, v in (("snexport.packed", "weights.bin"), ("ünïcode", "värde")):
        e = expect.metadata_props.add()
        e.key, e.value = k, v
    assert _read(out) == expect.SerializeToString()


def test_metadata_on_model_without_metadata_and_duplicates(tmp_path):
    model = _matmul_model()
    del model.metadata_props[:]
    for v in ("a", "b"):  # duplicate keys collapse to one entry on set
        e = model.metadata_props.add()
        e.key, e.value = "dup", v
    data = model.SerializeToString()
    m = op.parse_model(data)
    assert m.metadata == {"dup": "b"}
    m.set_metadata("dup", "c")
    m.set_metadata("new", "x")
    ref = onnx.load_from_string(m.to_bytes())
    assert [(p.key, p.value) for p in ref.metadata_props] == [("dup", "c"), ("new", "x")]
    with pytest.raises(TypeError):
        m.set_metadata("k", 1)


def test_save_overwrites_source_path(models, tmp_path):
    p = str(tmp_path / "m.onnx")
    shutil.copy(models["vit"], p)
    m = op.read_model(p)
    m.set_metadata("k", "v")
    m.save(p)
    assert op.metadata(p)["k"] == "v"
    onnx.checker.check_model(p)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".onnxproto-")]


# --------------------------------------------------------------------------
# Robustness
# --------------------------------------------------------------------------

def _one_line_error(exc_info):
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("data", [
    b"\x08",                                  # truncated varint
    b"\x08\x80\x80",                          # truncated varint
    b"\x0a\x05abc",                           # length overruns buffer
    b"\x0a" + op._varint(2 ** 62) + b"x",     # absurd length
    b"\x0a" + b"\xff" * 9 + b"\x7f",          # length > 64 bits
    b"\x08" + b"\x80" * 10 + b"\x01",         # varint longer than 10 bytes
    b"\x0e\x00",                              # wire type 6
    b"\x0f\x00",                              # wire type 7
    b"\x00\x01",                              # field number 0
    b"\x0c",                                  # unexpected end group
    b"\x0b\x08\x01",                          # unterminated group
    b"\x0b\x14",                              # mismatched end group
    b"\x09\x01\x02\x03",                      # truncated fixed64
    b"\x0d\x01",                              # truncated fixed32
    b"\x80",                                  # truncated tag
])
def test_malformed_wire_format_raises(data):
    with pytest.raises(OnnxFormatError) as ei:
        Message(data)
    _one_line_error(ei)


def test_nesting_depth_limits():
    data = b""
    for _ in range(op.MAX_DEPTH + 5):
        data = b"\x0a" + op._varint(len(data)) + data
    m = Message(data)
    with pytest.raises(OnnxFormatError, match="nested deeper"):
        for _ in range(op.MAX_DEPTH + 5):
            m = m.get_message(1)
    groups = b"\x0b" * (op.MAX_DEPTH + 5) + b"\x0c" * (op.MAX_DEPTH + 5)
    with pytest.raises(OnnxFormatError, match="nested deeper"):
        Message(groups)


def test_typed_accessor_errors():
    with pytest.raises(OnnxFormatError, match="wire type"):
        op.parse_model(b"\x38\x01").graph  # graph (7) encoded as varint
    with pytest.raises(OnnxFormatError, match="no graph"):
        op.parse_model(b"\x08\x08").graph
    with pytest.raises(OnnxFormatError, match="occurs 2 times"):
        op.parse_model(b"\x3a\x00\x3a\x00").graph
    with pytest.raises(OnnxFormatError, match="UTF-8"):
        op.parse_model(b"\x12\x02\xff\xfe").producer_name
    with pytest.raises(OnnxFormatError, match="empty"):
        op.parse_model(b"")
    bad_offset = helper.make_tensor("t", TensorProto.FLOAT, [1], [0.0])
    bad_offset.ClearField("float_data")
    bad_offset.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "x.bin"), ("offset", "12abc")):
        e = bad_offset.external_data.add()
        e.key, e.value = k, v
    model = helper.make_model(helper.make_graph([], "g", [], [], initializer=[bad_offset]))
    with pytest.raises(OnnxFormatError, match="offset"):
        op.initializer_infos(op.parse_model(model.SerializeToString()))


def test_empty_and_truncated_files(models, tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    for fn in (op.read_model, op.initializer_infos, op.metadata, op.io_info):
        with pytest.raises(OnnxFormatError):
            fn(str(p))
    data = _read(models["vit"])
    p = tmp_path / "half.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxFormatError) as ei:
        op.initializer_infos(str(p))
    _one_line_error(ei)


def _graph_span(data):
    for f in op.decode_fields(data):
        if f.number == 7:
            return f.offset, f.offset + len(f.value)
    raise AssertionError("no graph")


def test_every_truncation_raises_cleanly(models):
    data = _read(models["matmul"])
    g_start, g_end = _graph_span(data)
    for cut in range(len(data)):
        try:
            _walk(op.parse_model(data[:cut]))
        except OnnxFormatError as e:
            assert "\n" not in str(e)
        else:
            # A cut at a top-level field boundary is a valid shorter message,
            # but no cut inside the graph payload may go unnoticed.
            assert not g_start <= cut < g_end, cut


def test_random_corruption_only_raises_format_error(models):
    data = _read(models["vit"])
    rng = random.Random(1234)
    failures = 0
    for _ in range(300):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        try:
            _walk(op.parse_model(bytes(buf)))
        except OnnxFormatError:
            failures += 1
    assert failures > 0  # the fuzzer actually reached error paths


# --------------------------------------------------------------------------
# Performance: zero-copy parsing
# --------------------------------------------------------------------------

def test_large_embedded_weights_are_not_copied(tmp_path):
    big = np.arange(4 * 1024 * 1024, dtype=np.float32).reshape(2048, 2048)  # 16 MiB
    g = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "big",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2048])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2048])],
        initializer=[numpy_helper.from_array(big, "W")])
    data = helper.make_model(g).SerializeToString()
    m = op.parse_model(data)
    w = m.graph.initializer("W")
    raw = w.raw_data
    infos = op.initializer_infos(m)
    assert isinstance(raw, memoryview) and raw.obj is data  # a view, not a copy
    assert w.data_bytes().obj is data
    assert len(raw) == big.nbytes and infos["W"]["embedded_bytes"] == big.nbytes
    m.set_metadata("k", "v")  # output chunks reference the input buffer too
    chunks = m.msg.chunks()
    assert any(isinstance(c, memoryview) and c.obj is data and len(c) >= big.nbytes for c in chunks)
    assert sum(len(c) for c in chunks) == len(data) + len(b"\x72\x06\x0a\x01k\x12\x01v")
