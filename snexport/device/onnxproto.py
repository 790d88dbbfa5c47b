"""Read and rewrite ONNX model files using only the Python standard library.

Why this exists: the device half of snexport runs where only Python,
onnxruntime and numpy are installed, yet it must inspect models (metadata,
I/O signature, initializer layout) and rewrite them (point initializers at a
packed weight file, stamp metadata).  The `onnx`/`protobuf` packages are not
available there, so this module speaks the protobuf wire format directly.

Design:
  * `Message` is a generic, lossless view of one protobuf message: an ordered
    list of `Field(number, wire_type, value)`.  Each field also remembers the
    exact bytes it was parsed from, so unchanged fields (and unchanged
    sub-messages) are written back verbatim -> byte-identical round trips even
    for non-canonical encodings and unknown fields.
  * Parsing is lazy: a message only splits its own level into fields; payloads
    of length-delimited fields stay `memoryview` slices of the original
    buffer (no copies of weight bytes) until someone descends into them.
  * Modified messages are re-encoded on save; their parents are re-encoded too
    because a child's length prefix changes (tensor -> graph -> model).
  * Typed wrappers (`Model`, `Graph`, `Tensor`, `ValueInfo`, `Node`) cover just
    what snexport needs; field numbers come from onnx/onnx.proto.
  * Every decoding problem raises `OnnxFormatError` (a ValueError) with a
    one-line message - never IndexError / struct.error / UnicodeDecodeError.

What ONNX Runtime accepts (found while testing this module against it):
  * external_data may hold location/offset/length plus `checksum` and ORT's
    own `prepacked*` entries; any other key makes ORT refuse the model.
  * shape-like initializers (Reshape's `shape`) must stay embedded: ORT's
    shape inference does not read them from external data.

Targets Python >= 3.8 (edge-device interpreters can be old).
"""

from __future__ import annotations

import mmap
import os
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

__all__ = [
    "OnnxFormatError", "Field", "Message", "decode_fields", "encode_fields", "Model", "Graph", "Tensor",
    "ValueInfo", "Node", "parse_model", "read_model", "initializer_infos",
    "metadata", "io_info", "numpy_dtype_name", "ONNX_TO_NUMPY",
    "ELEMENT_SIZE", "WT_VARINT", "WT_I64", "WT_LEN", "WT_SGROUP",
    "WT_EGROUP", "WT_I32", "DATA_LOCATION_DEFAULT", "DATA_LOCATION_EXTERNAL",
    "MAX_DEPTH",
]


class OnnxFormatError(ValueError):
    """The bytes are not a well-formed protobuf / ONNX message."""


# --------------------------------------------------------------------------
# Wire format constants
# --------------------------------------------------------------------------

WT_VARINT, WT_I64, WT_LEN, WT_SGROUP, WT_EGROUP, WT_I32 = 0, 1, 2, 3, 4, 5

# Same default recursion limit as the reference protobuf implementation; ONNX
# models nest a handful of levels (model/graph/node/attribute/graph/...), so
# anything deeper than this is hostile or corrupt input.
MAX_DEPTH = 100
_MAX_FIELD_NUMBER = (1 << 29) - 1
_U64 = (1 << 64) - 1

DATA_LOCATION_DEFAULT = 0
DATA_LOCATION_EXTERNAL = 1

# ONNX TensorProto.DataType -> numpy dtype name.  None means numpy has no
# native type (bfloat16, float8, int4, ...), so callers must handle raw bytes.
ONNX_TO_NUMPY: Dict[int, Optional[str]] = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16",
    6: "int32", 7: "int64", 8: "object", 9: "bool", 10: "float16",
    11: "float64", 12: "uint32", 13: "uint64", 14: "complex64",
    15: "complex128", 16: None,
}

# Bytes per element for fixed-size types, including those without a numpy
# name, so a weight packer can validate length == prod(dims) * size.
ELEMENT_SIZE: Dict[int, int] = {
    1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8,
    12: 4, 13: 8, 14: 8, 15: 16, 16: 2, 17: 1, 18: 1, 19: 1, 20: 1,
}


def numpy_dtype_name(data_type: int) -> Optional[str]:
    """numpy dtype name for an ONNX data type, or None if numpy lacks one."""
    return ONNX_TO_NUMPY.get(data_type)


# --------------------------------------------------------------------------
# Low-level codec
# --------------------------------------------------------------------------

Buffer = Union[bytes, bytearray, memoryview]


def _read_varint(buf: memoryview, pos: int, end: int) -> Tuple[int, int]:
    """Decode one base-128 varint; returns (value, new_pos)."""
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise OnnxFormatError("truncated varint at byte %d" % pos)
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift >= 70:
            raise OnnxFormatError("varint longer than 10 bytes at byte %d" % pos)
    if result > _U64:
        raise OnnxFormatError("varint exceeds 64 bits at byte %d" % pos)
    return result, pos


def _varint(value: int) -> bytes:
    """Encode an int as a varint; negatives become 64-bit two's complement
    (that is how protobuf encodes negative int32/int64)."""
    if value < 0:
        value += 1 << 64
    if not 0 <= value <= _U64:
        raise ValueError("value %r does not fit in 64 bits" % value)
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _signed64(value: int) -> int:
    """Reinterpret an unsigned varint as int64 (int32 negatives are
    sign-extended to 64 bits on the wire, so this works for both)."""
    return value - (1 << 64) if value >= 1 << 63 else value


class Field:
    """One occurrence of a field: (number, wire_type, value).

    value is an int for VARINT / I64 / I32 (unsigned, as on the wire) and a
    bytes-like object (usually a memoryview slice) for LEN and groups (the
    group's inner bytes).  `raw` is the exact original encoding (tag
    included) or None once the field was created or changed in memory.
    """

    __slots__ = ("number", "wire_type", "value", "raw", "offset", "_msg")

    def __init__(self, number: int, wire_type: int, value: Any,
                 raw: Optional[memoryview] = None, offset: int = 0) -> None:
        self.number = number
        self.wire_type = wire_type
        self.value = value
        self.raw = raw
        self.offset = offset  # absolute position of the value, for errors
        self._msg: Optional[Message] = None  # cached decoded sub-message

    def __iter__(self):  # allows `number, wt, value = field`
        return iter((self.number, self.wire_type, self.value))

    def __repr__(self) -> str:
        v = self.value
        if not isinstance(v, int):
            v = "<%d bytes>" % len(v)
        return "Field(%d, %d, %s)" % (self.number, self.wire_type, v)

    def encode_value(self) -> List[Buffer]:
        """Fresh encoding (tag + payload) as a list of chunks; big payloads
        are returned as-is rather than concatenated, to avoid copying."""
        n, wt, v = self.number, self.wire_type, self.value
        if wt == WT_VARINT:
            return [_tag(n, wt) + _varint(v)]
        if wt == WT_I64:
            return [_tag(n, wt) + (v & _U64).to_bytes(8, "little")]
        if wt == WT_I32:
            return [_tag(n, wt) + (v & 0xFFFFFFFF).to_bytes(4, "little")]
        if wt == WT_LEN:
            return [_tag(n, wt) + _varint(len(v)), v]
        if wt == WT_SGROUP:
            return [_tag(n, WT_SGROUP), v, _tag(n, WT_EGROUP)]
        raise ValueError("cannot encode wire type %d" % wt)


def _skip_group(buf: memoryview, pos: int, end: int, number: int,
                depth: int) -> Tuple[int, int]:
    """Skip a (deprecated) group body; returns (content_end, pos_after_end_tag).
    ONNX never uses groups, but a lossless generic parser must not choke."""
    stack = [number]
    while True:
        if len(stack) + depth > MAX_DEPTH:
            raise OnnxFormatError("groups nested deeper than %d" % MAX_DEPTH)
        tag_start = pos
        key, pos = _read_varint(buf, pos, end)
        num, wt = key >> 3, key & 7
        if wt == WT_VARINT:
            _, pos = _read_varint(buf, pos, end)
        elif wt == WT_I64 or wt == WT_I32:
            pos += 8 if wt == WT_I64 else 4
            if pos > end:
                raise OnnxFormatError("truncated fixed-width value at byte %d" % tag_start)
        elif wt == WT_LEN:
            length, pos = _read_varint(buf, pos, end)
            if length > end - pos:
                raise OnnxFormatError("length %d at byte %d overruns buffer" % (length, tag_start))
            pos += length
        elif wt == WT_SGROUP:
            stack.append(num)
        elif wt == WT_EGROUP:
            if stack.pop() != num:
                raise OnnxFormatError("mismatched end-group tag at byte %d" % tag_start)
            if not stack:
                return tag_start, pos
        else:
            raise OnnxFormatError("invalid wire type %d at byte %d" % (wt, tag_start))


def decode_fields(data: Buffer, depth: int = 0, base: int = 0) -> List[Field]:
    """Split one message level into Fields without decoding payloads.
    `base` is the absolute offset of `data`, used only in error messages."""
    buf = data if isinstance(data, memoryview) else memoryview(data)
    if buf.format != "B" or buf.ndim != 1:
        buf = buf.cast("B")
    fields: List[Field] = []
    pos, end = 0, len(buf)
    while pos < end:
        start = pos
        try:
            key, pos = _read_varint(buf, pos, end)
        except OnnxFormatError:
            raise OnnxFormatError("truncated field tag at byte %d" % (base + start)) from None
        number, wt = key >> 3, key & 7
        if number == 0 or number > _MAX_FIELD_NUMBER:
            raise OnnxFormatError("invalid field number %d at byte %d" % (number, base + start))
        voff = pos
        if wt == WT_VARINT:
            try:
                value, pos = _read_varint(buf, pos, end)
            except OnnxFormatError as e:
                raise OnnxFormatError("%s (field %d at byte %d)" % (e, number, base + start)) from None
        elif wt == WT_LEN:
            try:
                length, pos = _read_varint(buf, pos, end)
            except OnnxFormatError:
                raise OnnxFormatError("truncated length of field %d at byte %d" % (number, base + start)) from None
            # Bounding by the remaining bytes is what rejects absurd lengths.
            if length > end - pos:
                raise OnnxFormatError("field %d at byte %d declares %d bytes but only %d remain"
                                      % (number, base + start, length, end - pos))
            voff = pos
            value = buf[pos:pos + length]
            pos += length
        elif wt == WT_I64 or wt == WT_I32:
            width = 8 if wt == WT_I64 else 4
            if width > end - pos:
                raise OnnxFormatError("truncated fixed%d field %d at byte %d" % (width * 8, number, base + start))
            value = int.from_bytes(buf[pos:pos + width], "little")
            pos += width
        elif wt == WT_SGROUP:
            try:
                content_end, pos = _skip_group(buf, pos, end, number, depth)
            except OnnxFormatError as e:
                raise OnnxFormatError("%s (group %d at byte %d)" % (e, number, base + start)) from None
            value = buf[voff:content_end]
        elif wt == WT_EGROUP:
            raise OnnxFormatError("unexpected end-group tag at byte %d" % (base + start))
        else:
            raise OnnxFormatError("invalid wire type %d at byte %d" % (wt, base + start))
        fields.append(Field(number, wt, value, buf[start:pos], base + voff))
    return fields


def encode_fields(fields: Iterable[Field]) -> bytes:
    """Fresh canonical encoding of a flat field list (ignores `raw`)."""
    return b"".join(bytes(c) for f in fields for c in f.encode_value())


class Message:
    """Generic lossless protobuf message (one level parsed, children lazy)."""

    __slots__ = ("_buf", "_fields", "_dirty", "_depth", "_base")

    def __init__(self, data: Buffer = b"", depth: int = 0, base: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise OnnxFormatError("messages nested deeper than %d (at byte %d)" % (MAX_DEPTH, base))
        buf = data if isinstance(data, memoryview) else memoryview(data)
        self._buf = buf
        self._depth = depth
        self._base = base
        self._fields = decode_fields(buf, depth, base)
        self._dirty = False

    # ---- reading -------------------------------------------------------
    @property
    def fields(self) -> List[Field]:
        """The ordered field list (a copy; mutate through the methods)."""
        return list(self._fields)

    def all(self, number: int) -> List[Field]:
        return [f for f in self._fields if f.number == number]

    def has(self, number: int) -> bool:
        return any(f.number == number for f in self._fields)

    def _last(self, number: int, wire_type: int) -> Optional[Field]:
        found = None
        for f in self._fields:
            if f.number == number:
                if f.wire_type != wire_type:
                    raise OnnxFormatError("field %d at byte %d has wire type %d, expected %d"
                                          % (number, f.offset, f.wire_type, wire_type))
                found = f  # protobuf: the last occurrence of a scalar wins
        return found

    def get_int(self, number: int, default: int = 0, signed: bool = True) -> int:
        f = self._last(number, WT_VARINT)
        if f is None:
            return default
        return _signed64(f.value) if signed else f.value

    def get_bytes(self, number: int) -> Optional[Buffer]:
        f = self._last(number, WT_LEN)
        if f is None:
            return None
        if f._msg is not None:
            # f.value goes stale once the decoded child is edited.
            _, parts, changed = f._msg._encode(True)
            if changed:
                return b"".join(parts)
        return f.value

    def get_str(self, number: int, default: str = "") -> str:
        f = self._last(number, WT_LEN)
        return default if f is None else _utf8(f)

    def get_strs(self, number: int) -> List[str]:
        return [_utf8(f) for f in self._typed(number, WT_LEN)]

    def get_ints(self, number: int, signed: bool = True) -> List[int]:
        """Repeated integer field, accepting packed and unpacked encodings
        (parsers must accept both, even mixed, for repeated scalars)."""
        out: List[int] = []
        for f in self._fields:
            if f.number != number:
                continue
            if f.wire_type == WT_VARINT:
                out.append(f.value)
            elif f.wire_type == WT_LEN:
                buf, pos, end = f.value, 0, len(f.value)
                while pos < end:
                    try:
                        v, pos = _read_varint(buf, pos, end)
                    except OnnxFormatError as e:
                        raise OnnxFormatError("bad packed field %d at byte %d: %s"
                                              % (number, f.offset, e)) from None
                    out.append(v)
            else:
                raise OnnxFormatError("field %d at byte %d has wire type %d, expected varint"
                                      % (number, f.offset, f.wire_type))
        return [_signed64(v) for v in out] if signed else out

    def _typed(self, number: int, wire_type: int) -> List[Field]:
        out = []
        for f in self._fields:
            if f.number == number:
                if f.wire_type != wire_type:
                    raise OnnxFormatError("field %d at byte %d has wire type %d, expected %d"
                                          % (number, f.offset, f.wire_type, wire_type))
                out.append(f)
        return out

    def _child(self, f: Field) -> "Message":
        if f._msg is None:
            f._msg = Message(f.value, self._depth + 1, f.offset)
        return f._msg

    def get_message(self, number: int) -> Optional["Message"]:
        """A singular sub-message (decoded once, then cached)."""
        fs = self._typed(number, WT_LEN)
        if not fs:
            return None
        if len(fs) > 1:
            # Protobuf would merge the occurrences; ONNX writers never emit
            # that, so refuse loudly instead of silently picking one.
            raise OnnxFormatError("singular message field %d occurs %d times (merging unsupported)"
                                  % (number, len(fs)))
        return self._child(fs[0])

    def messages(self, number: int) -> List["Message"]:
        """All occurrences of a repeated sub-message field, decoded lazily."""
        return [self._child(f) for f in self._typed(number, WT_LEN)]

    # ---- writing -------------------------------------------------------
    def _insert_index(self, number: int) -> int:
        # Keep field-number order (what protobuf serializers emit) so edits
        # of canonical files stay canonical: insert before the first higher.
        for i, f in enumerate(self._fields):
            if f.number > number:
                return i
        return len(self._fields)

    def remove(self, number: int) -> int:
        """Delete every occurrence of a field; returns how many were removed."""
        before = len(self._fields)
        self._fields = [f for f in self._fields if f.number != number]
        removed = before - len(self._fields)
        if removed:
            self._dirty = True
        return removed

    def add(self, number: int, wire_type: int, value: Any) -> Field:
        """Append one occurrence (after existing ones of the same number).
        For LEN, value may be bytes, str (UTF-8) or a Message."""
        f = _make_field(number, wire_type, value)
        self._fields.insert(self._insert_index(number), f)
        self._dirty = True
        return f

    def set(self, number: int, wire_type: int, value: Any) -> Field:
        """Replace all occurrences with a single one, kept at the position of
        the first old occurrence (or inserted in field-number order)."""
        f = _make_field(number, wire_type, value)
        idx = next((i for i, g in enumerate(self._fields) if g.number == number), None)
        if idx is None:
            self._fields.insert(self._insert_index(number), f)
        else:
            self._fields[idx] = f
            self._fields = [g for i, g in enumerate(self._fields) if g.number != number or i == idx]
        self._dirty = True
        return f

    def touch(self) -> None:
        """Force re-encoding of this message on the next serialization."""
        self._dirty = True

    def _encode(self, reuse: bool) -> Tuple[int, List[Buffer], bool]:
        """Returns (size, chunks, changed).  With reuse=True, untouched
        messages and fields are emitted from their original bytes."""
        children: Dict[int, Tuple[int, List[Buffer], bool]] = {}
        changed = self._dirty
        for i, f in enumerate(self._fields):
            if f._msg is not None:
                res = f._msg._encode(reuse)
                children[i] = res
                changed = changed or res[2]
        if reuse and not changed:
            return len(self._buf), [self._buf], False
        parts: List[Buffer] = []
        size = 0
        for i, f in enumerate(self._fields):
            child = children.get(i)
            if child is not None and (child[2] or not reuse or f.raw is None):
                head = _tag(f.number, WT_LEN) + _varint(child[0])
                parts.append(head)
                parts.extend(child[1])
                size += len(head) + child[0]
            elif reuse and f.raw is not None:
                parts.append(f.raw)
                size += len(f.raw)
            else:
                chunks = f.encode_value()
                parts.extend(chunks)
                size += sum(len(c) for c in chunks)
        return size, parts, True

    def chunks(self, reuse: bool = True) -> List[Buffer]:
        """Serialized form as a list of buffers (avoids one big join)."""
        return self._encode(reuse)[1]

    def to_bytes(self, reuse: bool = True) -> bytes:
        """Serialize.  reuse=False re-encodes every field from its decoded
        value (used by tests to prove the encoder, not just the cache)."""
        parts = self.chunks(reuse)
        if len(parts) == 1:
            return bytes(parts[0])
        return b"".join(parts)


def _make_field(number: int, wire_type: int, value: Any) -> Field:
    if not 0 < number <= _MAX_FIELD_NUMBER:
        raise ValueError("invalid field number %r" % number)
    if wire_type in (WT_VARINT, WT_I64, WT_I32):
        if not isinstance(value, int):
            raise TypeError("wire type %d needs an int" % wire_type)
        _varint(value)  # range check (accepts negative int64)
        if value < 0:
            value += 1 << 64
        return Field(number, wire_type, value)
    if wire_type in (WT_LEN, WT_SGROUP):
        if isinstance(value, Message):
            f = Field(number, WT_LEN, b"")
            f._msg = value
            value.touch()  # never reuse its (possibly empty) original bytes
            return f
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError("wire type %d needs bytes, str or Message" % wire_type)
        return Field(number, wire_type, value)
    raise ValueError("cannot create a field with wire type %d" % wire_type)


def _utf8(f: Field) -> str:
    try:
        return bytes(f.value).decode("utf-8")
    except UnicodeDecodeError:
        raise OnnxFormatError("field %d at byte %d is not valid UTF-8" % (f.number, f.offset)) from None


def _string_entry(key: str, value: str) -> Message:
    """A fresh StringStringEntryProto {key=1, value=2}."""
    m = Message()
    m.add(1, WT_LEN, key)
    m.add(2, WT_LEN, value)
    return m


def _entries(msgs: List[Message]) -> List[Tuple[str, str]]:
    return [(m.get_str(1), m.get_str(2)) for m in msgs]


# --------------------------------------------------------------------------
# Typed ONNX views (field numbers from onnx/onnx.proto)
# --------------------------------------------------------------------------

class _View:
    __slots__ = ("msg",)

    def __init__(self, msg: Message) -> None:
        self.msg = msg


class ValueInfo(_View):
    """ValueInfoProto: name=1, type=2 (TypeProto.tensor_type=1 ->
    elem_type=1, shape=2 -> dim=1 -> dim_value=1 | dim_param=2)."""
    __slots__ = ()

    @property
    def name(self) -> str:
        return self.msg.get_str(1)

    def _tensor_type(self) -> Optional[Message]:
        t = self.msg.get_message(2)
        return None if t is None else t.get_message(1)

    @property
    def elem_type(self) -> Optional[int]:
        """Element type, or None when the value is not a tensor."""
        tt = self._tensor_type()
        return None if tt is None else tt.get_int(1)

    @property
    def shape(self) -> Optional[List[Union[int, str, None]]]:
        """Per-dimension int (static), str (symbolic) or None (unknown);
        None overall when no shape is recorded (unknown rank)."""
        tt = self._tensor_type()
        shp = None if tt is None else tt.get_message(2)
        if shp is None:
            return None
        dims: List[Union[int, str, None]] = []
        for d in shp.messages(1):
            if d.has(1):
                dims.append(d.get_int(1))
            elif d.has(2):
                dims.append(d.get_str(2))
            else:
                dims.append(None)
        return dims


class Node(_View):
    """NodeProto: input=1, output=2, name=3, op_type=4, domain=7."""
    __slots__ = ()

    op_type = property(lambda self: self.msg.get_str(4))
    domain = property(lambda self: self.msg.get_str(7))
    name = property(lambda self: self.msg.get_str(3))
    inputs = property(lambda self: self.msg.get_strs(1))
    outputs = property(lambda self: self.msg.get_strs(2))


_TYPED_DATA_FIELDS = (4, 5, 6, 7, 10, 11)  # float/int32/string/int64/double/uint64
_FLOAT_FIELD_TYPES = (1, 14)  # FLOAT, COMPLEX64: float_data
_DOUBLE_FIELD_TYPES = (11, 15)  # DOUBLE, COMPLEX128: double_data
_SIGNED_TYPES = (3, 5, 6)  # INT8, INT16, INT32 (int32_data holds them sign-extended)


class Tensor(_View):
    """TensorProto: dims=1, data_type=2, float_data=4, int32_data=5,
    string_data=6, int64_data=7, name=8, raw_data=9, double_data=10,
    uint64_data=11, external_data=13, data_location=14."""
    __slots__ = ()

    name = property(lambda self: self.msg.get_str(8))
    data_type = property(lambda self: self.msg.get_int(2))
    dims = property(lambda self: self.msg.get_ints(1))
    data_location = property(lambda self: self.msg.get_int(14))

    @property
    def raw_data(self) -> Optional[memoryview]:
        """Zero-copy view of the embedded bytes, or None if absent."""
        return self.msg.get_bytes(9)

    @property
    def has_typed_data(self) -> bool:
        return any(self.msg.has(n) for n in _TYPED_DATA_FIELDS)

    @property
    def external_entries(self) -> List[Tuple[str, str]]:
        """external_data as an ordered (key, value) list."""
        return _entries(self.msg.messages(13))

    @property
    def external_data(self) -> Dict[str, str]:
        return dict(self.external_entries)

    def data_bytes(self) -> Buffer:
        """The elements as little-endian bytes (what raw_data would hold), whichever field stores them.

        Exporters keep weights in raw_data (returned as the zero-copy view) but small constants often in the
        typed fields (float_data, int32_data, ...); this turns those into the same bytes, so a weight packer can
        hash and move any initializer without numpy or onnx.  External data is not read (its file is the
        caller's business); STRING and sub-byte types have no fixed layout and are refused."""
        raw = self.raw_data
        if raw is not None:
            return raw
        if self.data_location == DATA_LOCATION_EXTERNAL:
            raise OnnxFormatError("initializer %r keeps its data in an external file" % self.name)
        dt = self.data_type
        size = ELEMENT_SIZE.get(dt)
        try:
            if dt in _FLOAT_FIELD_TYPES:
                payload = self._fixed_width(4, WT_I32, 4)
            elif dt in _DOUBLE_FIELD_TYPES:
                payload = self._fixed_width(10, WT_I64, 8)
            elif dt == 7:  # INT64
                payload = b"".join(v.to_bytes(8, "little", signed=True) for v in self.msg.get_ints(7))
            elif dt in (12, 13):  # UINT32, UINT64
                payload = b"".join(v.to_bytes(size, "little") for v in self.msg.get_ints(11, signed=False))
            elif size is not None:
                # Everything else of fixed size lives in int32_data, one element per int (float16/bfloat16/
                # float8 as their bit patterns).
                signed = dt in _SIGNED_TYPES
                mask = (1 << (8 * size)) - 1
                payload = b"".join((v if signed else v & mask).to_bytes(size, "little", signed=signed)
                                   for v in self.msg.get_ints(5))
            else:
                raise OnnxFormatError("initializer %r has data type %d, which has no fixed-size element layout"
                                      % (self.name, dt))
        except OverflowError:
            raise OnnxFormatError("initializer %r holds a value out of range for data type %d"
                                  % (self.name, dt)) from None
        count = 1
        for d in self.dims:
            count *= d
        if len(payload) != count * size:
            raise OnnxFormatError("initializer %r holds %d bytes of data but its dims %s need %d"
                                  % (self.name, len(payload), self.dims, count * size))
        return payload

    def _fixed_width(self, number: int, wire_type: int, width: int) -> bytes:
        """A repeated float/double field as bytes: packed (one LEN field) and unpacked occurrences alike."""
        parts: List[bytes] = []
        for f in self.msg.all(number):
            if f.wire_type == WT_LEN:
                if len(f.value) % width:
                    raise OnnxFormatError("packed field %d at byte %d is not a multiple of %d bytes"
                                          % (number, f.offset, width))
                parts.append(bytes(f.value))
            elif f.wire_type == wire_type:
                parts.append(f.value.to_bytes(width, "little"))
            else:
                raise OnnxFormatError("field %d at byte %d has wire type %d, expected %d or %d"
                                      % (number, f.offset, f.wire_type, WT_LEN, wire_type))
        return b"".join(parts)

    def clear_data(self) -> None:
        """Drop embedded data: raw_data and every typed *_data field."""
        for n in (9,) + _TYPED_DATA_FIELDS:
            self.msg.remove(n)

    def set_external_entries(self, entries: Union[Dict[str, str], Iterable[Tuple[str, str]]]) -> None:
        """Replace external_data with exactly these entries (order kept)."""
        items = list(entries.items()) if isinstance(entries, dict) else list(entries)
        self.msg.remove(13)
        for k, v in items:
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError("external_data keys and values must be str")
            self.msg.add(13, WT_LEN, _string_entry(k, v))

    def set_external_data(self, location: str, offset: int, length: int,
                          extra: Union[Dict[str, str], Iterable[Tuple[str, str]]] = ()) -> None:
        """Point this tensor at `length` bytes at `offset` in `location`
        (relative to the model's directory), mark it EXTERNAL and drop the
        embedded copy.  `extra` adds further keys (e.g. checksum).

        Caveat: onnxruntime's shape inference cannot read shape-like inputs
        (e.g. Reshape's `shape`) from external data; keep small tensors
        embedded, as onnx.save does with its size_threshold."""
        if not location:
            raise ValueError("location must be a non-empty path")
        for label, v in (("offset", offset), ("length", length)):
            if not isinstance(v, int) or v < 0:
                raise ValueError("%s must be a non-negative int, got %r" % (label, v))
        extra_items = list(extra.items()) if isinstance(extra, dict) else list(extra)
        self.set_external_entries([("location", location), ("offset", str(offset)),
                                   ("length", str(length))] + extra_items)
        self.msg.set(14, WT_VARINT, DATA_LOCATION_EXTERNAL)
        self.clear_data()


class Graph(_View):
    """GraphProto: node=1, name=2, initializer=5, input=11, output=12."""
    __slots__ = ()

    name = property(lambda self: self.msg.get_str(2))

    @property
    def nodes(self) -> List[Node]:
        return [Node(m) for m in self.msg.messages(1)]

    @property
    def initializers(self) -> List[Tensor]:
        return [Tensor(m) for m in self.msg.messages(5)]

    @property
    def inputs(self) -> List[ValueInfo]:
        return [ValueInfo(m) for m in self.msg.messages(11)]

    @property
    def outputs(self) -> List[ValueInfo]:
        return [ValueInfo(m) for m in self.msg.messages(12)]

    def initializer(self, name: str) -> Optional[Tensor]:
        for t in self.initializers:
            if t.name == name:
                return t
        return None

    def op_types(self) -> List[Tuple[str, str]]:
        """(domain, op_type) of every node, in graph order."""
        return [(n.domain, n.op_type) for n in self.nodes]


class Model(_View):
    """ModelProto: ir_version=1, producer_name=2, producer_version=3,
    graph=7, opset_import=8 (domain=1, version=2), metadata_props=14."""
    __slots__ = ()

    ir_version = property(lambda self: self.msg.get_int(1))
    producer_name = property(lambda self: self.msg.get_str(2))
    producer_version = property(lambda self: self.msg.get_str(3))

    @property
    def graph(self) -> Graph:
        g = self.msg.get_message(7)
        if g is None:
            raise OnnxFormatError("model has no graph")
        return Graph(g)

    @property
    def opset_import(self) -> Dict[str, int]:
        """{domain: version}; "" is the default ai.onnx domain."""
        return {m.get_str(1): m.get_int(2) for m in self.msg.messages(8)}

    @property
    def metadata_entries(self) -> List[Tuple[str, str]]:
        return _entries(self.msg.messages(14))

    @property
    def metadata(self) -> Dict[str, str]:
        return dict(self.metadata_entries)  # duplicate keys: last wins

    def set_metadata(self, key: str, value: str) -> None:
        """Add or replace metadata_props[key] (replaced in place; any
        duplicate entries for the key are dropped)."""
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("metadata keys and values must be str")
        kept: List[Field] = []
        replaced = False
        for f in self.msg._fields:
            if f.number == 14 and self.msg._child(f).get_str(1) == key:
                if replaced:
                    continue
                f = _make_field(14, WT_LEN, _string_entry(key, value))
                replaced = True
            kept.append(f)
        self.msg._fields = kept
        self.msg._dirty = True
        if not replaced:
            self.msg.add(14, WT_LEN, _string_entry(key, value))

    def to_bytes(self) -> bytes:
        return self.msg.to_bytes()

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write atomically (temp file + rename) and without joining the
        chunks, so big embedded weights are not copied once more."""
        path = os.fspath(path)
        parts = self.msg.chunks()
        fd, tmp = tempfile.mkstemp(prefix=".onnxproto-", dir=os.path.dirname(os.path.abspath(path)))
        try:
            with os.fdopen(fd, "wb") as f:
                for p in parts:
                    f.write(p)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------

PathOrModel = Union[str, os.PathLike, "Model"]


def parse_model(data: Buffer) -> Model:
    """Parse ModelProto bytes (top level only; the rest lazily)."""
    if len(data) == 0:
        raise OnnxFormatError("empty input is not an ONNX model")
    return Model(Message(data))


def read_model(path: Union[str, os.PathLike]) -> Model:
    """Read a whole .onnx file into memory (one copy, so the same path can
    be overwritten by Model.save later)."""
    with open(path, "rb") as f:
        data = f.read()
    return parse_model(data)


def _with_model(src: PathOrModel, fn: Callable[[Model], Any]) -> Any:
    """Run fn on a model; paths are mmapped read-only so that inspecting a
    model with embedded weights never reads the weight pages."""
    if isinstance(src, Model):
        return fn(src)
    with open(src, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise OnnxFormatError("empty file is not an ONNX model: %s" % os.fspath(src))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        # We only read field tags between weight blobs; on a cold cache this
        # stops readahead from pulling the weights in from disk.
        mm.madvise(mmap.MADV_RANDOM)
    try:
        return fn(parse_model(memoryview(mm)))
    finally:
        try:
            mm.close()
        except BufferError:
            pass  # a traceback still references slices; GC will unmap it


def _external_int(t: Tensor, ext: Dict[str, str], key: str) -> Optional[int]:
    if key not in ext:
        return None
    try:
        v = int(ext[key])
    except ValueError:
        v = -1
    if v < 0:
        raise OnnxFormatError("initializer %r has invalid external %s %r" % (t.name, key, ext[key]))
    return v


def _init_info(t: Tensor) -> Dict[str, Any]:
    ext = t.external_data
    raw = t.raw_data
    return {
        "dims": t.dims,
        "data_type": t.data_type,
        "data_location": t.data_location,
        "location": ext.get("location"),
        "offset": _external_int(t, ext, "offset"),
        "length": _external_int(t, ext, "length"),
        "extra": {k: v for k, v in ext.items() if k not in ("location", "offset", "length")},
        "embedded_bytes": None if raw is None else len(raw),
    }


def initializer_infos(src: PathOrModel) -> Dict[str, Dict[str, Any]]:
    """{name: {dims, data_type, data_location, location, offset, length,
    extra, embedded_bytes}} for the main graph's initializers.  External
    files are never opened; offset/length are None when not recorded."""
    return _with_model(src, lambda m: {t.name: _init_info(t) for t in m.graph.initializers})


def metadata(src: PathOrModel) -> Dict[str, str]:
    """ModelProto.metadata_props as a dict."""
    return _with_model(src, lambda m: m.metadata)


def _vi_info(v: ValueInfo) -> Dict[str, Any]:
    et = v.elem_type
    return {"name": v.name, "elem_type": et,
            "dtype": None if et is None else numpy_dtype_name(et), "shape": v.shape}


def io_info(src: PathOrModel, include_initializers: bool = False) -> Dict[str, List[Dict[str, Any]]]:
    """{"inputs": [...], "outputs": [...]}, each {name, elem_type, dtype,
    shape}.  Graph inputs that are initializers (old IR < 4 style) are
    skipped by default, matching what onnxruntime reports as inputs."""
    def fn(m: Model) -> Dict[str, List[Dict[str, Any]]]:
        g = m.graph
        inits = set() if include_initializers else {t.name for t in g.initializers}
        return {"inputs": [_vi_info(v) for v in g.inputs if v.name not in inits],
                "outputs": [_vi_info(v) for v in g.outputs]}
    return _with_model(src, fn)
