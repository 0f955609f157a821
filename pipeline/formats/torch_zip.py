"""PyTorch zip checkpoints (`torch.save` since 1.6: `.bin`, `.pt`, `.pth`), read without running pickles.

A torch zip holds `<prefix>/data.pkl` (the object tree, a pickle) and one uncompressed member
`<prefix>/data/<key>` per storage. We parse `data.pkl` with an allow-list unpickler that turns tensors into
inert records (storage key, offset, shape, stride, dtype) and refuses every other global, so no code from
the file ever runs. Tensor bytes are then plain byte ranges of the zip, read lazily like safetensors.
"""

from __future__ import annotations

import collections
import io
import lzma
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.blobs import RangeReader
from pipeline.errors import FormatError, ModelhashError, UnsafePickleError
from pipeline.formats.directory import DTYPE_SIZES, TensorDirectory, TensorEntry, check_text, checked_numel

__all__ = ["FORMAT", "MAX_PICKLE_BYTES", "MAX_PICKLE_DEPTH", "MAX_PICKLE_OPS", "open", "read_entries"]

FORMAT = "torch_zip"
# data.pkl of a state dict with 100k tensors is a few MB; anything this large is not a checkpoint.
MAX_PICKLE_BYTES = 256 * 2**20
# How deep data.pkl's objects may nest. A checkpoint nests a few levels (checkpoint dict, state dict,
# tensor arguments); CPython hashes a tuple key recursively in C, so a tuple nested a million deep kills the
# process while unpickling. The depth is therefore bounded by scanning the opcodes before unpickling.
MAX_PICKLE_DEPTH = 100
# How many opcodes data.pkl may hold: torch.save writes about 35 per tensor (3.5M for 100k tensors). Each
# builds at most one object, so this bounds what unpickling allocates (`}` * 200M would build 200M dicts)
# and how long the depth scan takes (about half a second per million opcodes).
MAX_PICKLE_OPS = 20_000_000
# `byteorder` holds "little" or "big"; read no more than this of it, however much it inflates to.
_MAX_BYTEORDER_BYTES = 16
# A compressed (deflated) data.pkl may inflate to this many times its compressed size, plus 1 MiB: a pickle
# compresses a few times, a bomb a thousand.
_MAX_INFLATION = 100

# Typed storage classes (`torch.FloatStorage`, ...) by the dtype of their elements; None: a valid torch
# storage whose elements we cannot decode (complex, quantized), refused with a FormatError, not as unsafe.
_STORAGES: dict[str, str | None] = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
    "ComplexFloatStorage": None, "ComplexDoubleStorage": None, "QInt8Storage": None,
    "QUInt8Storage": None, "QInt32Storage": None, "QUInt4x2Storage": None, "QUInt2x4Storage": None,
}
# `torch.<dtype>` globals, the dtype argument of `_rebuild_tensor_v3` (used for dtypes with no typed
# storage class: float8, uint16/32/64).
_DTYPES: dict[str, str | None] = {
    "float64": "F64", "double": "F64", "float32": "F32", "float": "F32", "float16": "F16", "half": "F16",
    "bfloat16": "BF16", "int64": "I64", "long": "I64", "int32": "I32", "int": "I32", "int16": "I16",
    "short": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16", "uint32": "U32",
    "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "complex32": None, "complex64": None, "complex128": None, "float8_e4m3fnuz": None,
    "float8_e5m2fnuz": None, "float8_e8m0fnu": None, "qint8": None, "quint8": None, "qint32": None,
}
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zipfile's structFileHeader, 30 bytes


def read_entries(reader: RangeReader, file: str = "") -> dict[str, TensorEntry]:
    """The tensors of one torch zip checkpoint, reading its zip directory, data.pkl and local headers.

    Nested dicts (`{"state_dict": {...}}`) are flattened to dotted names; other leaves (numbers,
    strings, lists, None) are dropped.

    Raises:
        UnsafePickleError: data.pkl references a global outside the allow-list (nothing was executed).
        FormatError: not a zip checkpoint (legacy pickle, truncated or lying zip, compressed storage,
            non-contiguous or undecodable tensor).
    """
    label = file or "torch checkpoint"
    magic = reader.read(0, min(4, reader.size))
    if magic[:1] == b"\x80":
        raise FormatError(
            f"{label}: legacy pickle checkpoint (pre-zip torch.save) not supported; not unpickled"
        )
    if not magic.startswith(b"PK"):
        raise FormatError(f"{label}: not a zip archive (starts with {magic!r})")
    try:
        archive = zipfile.ZipFile(_ReaderFile(reader))
        members = {info.filename: info for info in archive.infolist()}
        prefix = _archive_prefix(members, label)
        byteorder = members.get(f"{prefix}/byteorder")
        order = b"little" if byteorder is None else _read_member(archive, byteorder, _MAX_BYTEORDER_BYTES, label)
        if order.strip() != b"little":
            raise FormatError(f"{label}: big-endian checkpoint not supported")
        raw = _read_member(archive, members[f"{prefix}/data.pkl"], MAX_PICKLE_BYTES, label)
    except ModelhashError:  # ours, and a BlobError from the reader: already say what went wrong
        raise
    except EOFError as exc:  # zipfile's, with no message: a member's compressed bytes end early
        raise FormatError(f"{label}: broken zip archive: member data ends early (truncated?)") from exc
    except (zipfile.BadZipFile, zipfile.LargeZipFile, struct.error, ValueError, NotImplementedError,
            RuntimeError, OSError, zlib.error, lzma.LZMAError) as exc:
        # zipfile's own errors for hostile archives: NotImplementedError for a member it cannot open (strong
        # encryption, a zip64 variant), RuntimeError for an encrypted one; OSError, zlib.error and LZMAError
        # for corrupt compressed data.
        raise FormatError(f"{label}: broken zip archive: {str(exc) or type(exc).__name__}") from exc
    root = _load_pickle(raw, label)

    data_starts: dict[str, tuple[int, int]] = {}  # storage key -> (absolute data start, member size)
    entries: dict[str, TensorEntry] = {}
    for name, tensor in _flatten(root, label):
        key = tensor.storage.key
        if key not in data_starts:
            member = members.get(f"{prefix}/data/{key}")
            if member is None:
                raise FormatError(f"{label}: tensor {name!r} points at missing storage data/{key}")
            data_starts[key] = (_data_start(reader, member, label), member.file_size)
        start, size = data_starts[key]
        entries[name] = _entry(name, tensor, start, size, file, label)
    return entries


def open(reader: RangeReader, file: str = "pytorch_model.bin") -> TensorDirectory:
    """A TensorDirectory over one torch zip checkpoint; tensor bytes are read on demand."""
    return TensorDirectory(read_entries(reader, file), {file: reader}, FORMAT)


class _NegativeSeek(OSError):
    """A seek before byte 0: zipfile probes for its end record this way and expects an OSError."""


class _ReaderFile(io.RawIOBase):
    """A seekable read-only file over a RangeReader, so that zipfile reads only what it needs."""

    def __init__(self, reader: RangeReader):
        self._reader = reader
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._reader.size}[whence]
        if base + offset < 0:
            raise _NegativeSeek(f"seek to negative position {base + offset}")
        self._pos = base + offset
        return self._pos

    def read(self, size: int = -1) -> bytes:
        # RawIOBase.read allocates `size` bytes first, and zipfile asks for a member's compressed size, which
        # a hostile zip directory sets to gigabytes: allocate only what the file still holds.
        left = max(0, self._reader.size - self._pos)
        return super().read(left if size < 0 else min(size, left)) or b""

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._reader.size - self._pos))
        if n:
            buffer[:n] = self._reader.read(self._pos, n)
            self._pos += n
        return n


def _archive_prefix(members: Mapping[str, zipfile.ZipInfo], label: str) -> str:
    # The prefix is the file stem when torch.save wrote to a path, "archive" for a buffer: never assume.
    prefixes = {n[: -len("/data.pkl")] for n in members if n.endswith("/data.pkl") and n.count("/") == 1}
    if len(prefixes) != 1:
        found = "no" if not prefixes else "several"
        raise FormatError(f"{label}: {found} <archive>/data.pkl in zip: not a torch checkpoint")
    return prefixes.pop()


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, cap: int, label: str) -> bytes:
    """A small member's bytes, at most `cap` (or, deflated, `_MAX_INFLATION` times its compressed size)
    inflated, never more: a few hundred bytes can inflate to gigabytes. Stored or deflated only, as
    torch.load reads: zipfile inflates bzip2 and lzma with no bound on one call's output.
    """
    what = f"{label}: {member.filename}"
    if member.flag_bits & 0x1:
        raise FormatError(f"{what} is encrypted")
    if member.compress_type == zipfile.ZIP_DEFLATED and _MAX_INFLATION * member.compress_size + 2**20 < cap:
        cap = _MAX_INFLATION * member.compress_size + 2**20
        what += f" (deflated: at most {_MAX_INFLATION} times its {member.compress_size} bytes, plus 1 MiB)"
    elif member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise FormatError(f"{what} uses compression method {member.compress_type}; torch reads stored or deflated")
    if member.file_size > cap:
        raise FormatError(f"{what} is {member.file_size} bytes, above {cap}")
    with archive.open(member) as f:
        # zipfile stops at the declared size, checked above; read(cap), not read(), also bounds each step of
        # inflating (read() inflates a whole chunk of compressed bytes, up to 1000 times larger, at once).
        return f.read(cap)


def _data_start(reader: RangeReader, member: zipfile.ZipInfo, label: str) -> int:
    """Absolute offset of a stored member's bytes, from its local header (whose extra field torch pads)."""
    if member.compress_type != zipfile.ZIP_STORED or member.flag_bits & 0x1:
        raise FormatError(f"{label}: storage {member.filename} is compressed or encrypted; torch stores raw")
    if member.compress_size != member.file_size:
        raise FormatError(f"{label}: storage {member.filename} sizes disagree in the zip directory")
    name = member.orig_filename.encode("utf-8" if member.flag_bits & 0x800 else "cp437")
    at = member.header_offset
    if at < 0 or at + _LOCAL_HEADER.size + len(name) > reader.size:
        raise FormatError(f"{label}: local header of {member.filename} lies past end of file")
    raw = reader.read(at, _LOCAL_HEADER.size + len(name))
    fields = _LOCAL_HEADER.unpack(raw[: _LOCAL_HEADER.size])
    name_len, extra_len = fields[-2], fields[-1]
    if fields[0] != zipfile.stringFileHeader or raw[_LOCAL_HEADER.size :] != name or name_len != len(name):
        raise FormatError(f"{label}: zip directory points at a bad local header for {member.filename}")
    start = at + _LOCAL_HEADER.size + name_len + extra_len
    if start + member.file_size > reader.size:
        raise FormatError(
            f"{label}: storage {member.filename} ({member.file_size} bytes at {start}) past end of file "
            f"({reader.size} bytes): truncated?"
        )
    return start


def _entry(name: str, t: _Tensor, start: int, size: int, file: str, label: str) -> TensorEntry:
    """A TensorEntry for a rebuilt tensor, with its name, shape and span checked against the storage member."""
    check_text(name, f"{label}: tensor name")
    dtype = t.dtype
    if dtype is None or dtype.code is None:
        shown = dtype.name if dtype is not None else t.storage.type.name
        raise FormatError(f"{label}: tensor {name!r} has unsupported dtype torch.{shown}")
    if not _is_contiguous(t.shape, t.stride):
        raise FormatError(
            f"{label}: tensor {name!r} is not C-contiguous (shape {t.shape}, stride {t.stride}); "
            "only contiguous tensors are supported"
        )
    itemsize = DTYPE_SIZES[dtype.code]
    storage_bytes = t.storage.numel * (t.storage.type.itemsize or 1)
    if storage_bytes != size:
        raise FormatError(
            f"{label}: storage data/{t.storage.key} holds {size} bytes, the pickle says {storage_bytes}"
        )
    numel = checked_numel(t.shape, f"{label}: tensor {name!r}")
    begin = t.offset * itemsize
    end = begin + numel * itemsize
    if numel and end > size:
        raise FormatError(
            f"{label}: tensor {name!r} bytes [{begin}, {end}) past end of its storage ({size} bytes)"
        )
    span = (start + begin, start + end) if numel else (start, start)
    return TensorEntry(name, dtype.code, t.shape, span, file)


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    # torch's own rule: strides of size-1 dims are irrelevant, and an empty tensor is contiguous.
    if len(shape) != len(stride):
        return False
    if 0 in shape:
        return True
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


# ---- the allow-list unpickler and the inert values it builds ----


def _refuse_build(self: Any, state: Any) -> None:
    raise UnsafePickleError(f"data.pkl sets the state of {self!r} (pickle BUILD); refused")


def _inert(cls: type) -> type:
    """Refuse pickle's BUILD on a class's instances. A frozen slots dataclass gets a `__setstate__` that
    writes any field past the freeze, so BUILD could rewrite a shared `torch.float32` stand-in (or a
    checked tensor) for the rest of the process."""
    cls.__setstate__ = _refuse_build  # type: ignore[attr-defined]
    return cls


@_inert
@dataclass(frozen=True, slots=True)
class _DType:
    name: str  # torch's name, for messages
    code: str | None  # our dtype name, None if we cannot decode it

    @property
    def itemsize(self) -> int | None:
        return DTYPE_SIZES[self.code] if self.code else None


@_inert
@dataclass(frozen=True, slots=True)
class _StorageType:
    name: str
    dtype: _DType | None  # None for UntypedStorage (whose numel counts bytes)

    @property
    def itemsize(self) -> int | None:
        return self.dtype.itemsize if self.dtype else 1


@_inert
@dataclass(frozen=True, slots=True)
class _Storage:
    type: _StorageType
    key: str
    numel: int


@_inert
@dataclass(frozen=True, slots=True)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: _DType | None


def _ints(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, tuple | list) or not all(_is_count(v) for v in x):
        raise FormatError(f"bad tensor {what} {x!r}")
    return tuple(x)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: _DType | None) -> _Tensor:
    if not isinstance(storage, _Storage) or not _is_count(offset):
        raise FormatError("tensor rebuilt from something other than a storage")
    return _Tensor(storage, offset, _ints(size, "size"), _ints(stride, "stride"), dtype)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *_rest: Any) -> _Tensor:
    """Stands in for torch._utils._rebuild_tensor_v2 (requires_grad, hooks, metadata ignored)."""
    dtype = storage.type.dtype if isinstance(storage, _Storage) else None
    if dtype is None:
        raise FormatError("_rebuild_tensor_v2 over an untyped storage")
    return _tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_tensor_v3(
    storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any,
    *_rest: Any,
) -> _Tensor:
    """Stands in for torch._utils._rebuild_tensor_v3, which carries the dtype apart from the storage."""
    if not isinstance(dtype, _DType):
        raise FormatError(f"_rebuild_tensor_v3 with dtype {dtype!r}")
    return _tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    """Stands in for torch._utils._rebuild_parameter(_with_state): a Parameter is its tensor."""
    return data


class _Callable:
    """An allow-listed function or class as data.pkl sees it: calling it calls `func`. BUILD on a function
    or class would set its attributes (`__defaults__`, `__name__`) for the rest of the process; on this
    object it is refused, and it has no attribute a pickle could set."""

    __slots__ = ("_func",)

    def __init__(self, func: Any):
        self._func = func

    def __call__(self, *args: Any) -> Any:
        return self._func(*args)

    def __repr__(self) -> str:
        return f"<allowed {self._func.__module__}.{self._func.__qualname__}>"

    __setstate__ = _refuse_build


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _Callable(collections.OrderedDict),
    ("torch._utils", "_rebuild_tensor_v2"): _Callable(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Callable(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Callable(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Callable(_rebuild_parameter),
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", None),
    ("torch", "UntypedStorage"): _StorageType("UntypedStorage", None),
    **{("torch", n): _DType(n, code) for n, code in _DTYPES.items()},
    **{("torch", n): _StorageType(n, _DType(n, code)) for n, code in _STORAGES.items()},
}


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only the globals a state dict needs, to inert stand-ins; every other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            check_text(f"{module}.{name}", "global")  # so that the message below can be printed
            raise UnsafePickleError(f"forbidden global {module}.{name} in data.pkl; not executed") from None

    def persistent_load(self, pid: Any) -> _Storage:
        # torch writes ('storage', storage_type, key, location, numel); location does not matter here.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise FormatError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not _is_count(numel):
            raise FormatError(f"bad storage reference {pid!r}")
        check_text(key, "storage key")  # it is shown in messages
        return _Storage(storage_type, key, numel)


# How each opcode moves the stack, for the depth scan: (kind, items it pops; -1: down to the topmost mark).
_NEW, _MUTATE, _MARK, _POP, _DUP, _PUT, _MEMOIZE, _GET, _NOTHING = range(9)
_SPECIAL = {
    "MARK": _MARK, "POP": _POP, "POP_MARK": _POP, "DUP": _DUP, "PUT": _PUT, "BINPUT": _PUT,
    "LONG_BINPUT": _PUT, "MEMOIZE": _MEMOIZE, "GET": _GET, "BINGET": _GET, "LONG_BINGET": _GET,
    "PROTO": _NOTHING, "FRAME": _NOTHING, "STOP": _NOTHING,
}
# These change the container (or object) below their operands instead of pushing a new object.
_MUTATORS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})


def _effect(op: pickletools.OpcodeInfo) -> tuple[int, int]:
    pops = -1 if pickletools.markobject in op.stack_before else len(op.stack_before)
    if op.name in _SPECIAL:
        return _SPECIAL[op.name], pops
    if op.name in _MUTATORS:
        return _MUTATE, pops if pops < 0 else pops - 1  # the container stays
    return _NEW, pops


_EFFECTS = {op: _effect(op) for op in pickletools.opcodes}


def _check_bounds(raw: bytes) -> None:
    """Refuse a pickle whose objects would nest deeper than MAX_PICKLE_DEPTH (or that holds more than
    MAX_PICKLE_OPS opcodes), without building any.

    Simulates the unpickler's stack with each object's nesting depth: a new object is one deeper than what
    it is built from, a container one deeper than what is added to it, and the memo keeps depths. Linear in
    the pickle's length. (A container filled after it was memoized may nest deeper than this counts; only
    immutable tuples can be hashed, and theirs is exact. `_flatten` bounds the depth of dicts itself.)
    """
    stack: list[int] = []
    marks: list[list[int]] = []
    memo: dict[Any, int] = {}
    for count, (op, arg, _pos) in enumerate(pickletools.genops(raw)):
        if count == MAX_PICKLE_OPS:
            raise FormatError(f"more than {MAX_PICKLE_OPS} opcodes; not a state dict")
        kind, pops = _EFFECTS[op]
        if kind == _NEW and not pops:  # a string, a number, a global, an empty container: most opcodes
            stack.append(0)
        elif kind in (_NEW, _MUTATE):
            if pops < 0:
                popped, stack = stack, marks.pop()
            else:
                popped = _pop(stack, pops)
            depth = 1 + max(popped, default=-1)
            if kind == _NEW:
                stack.append(depth)
            else:  # the container below now holds objects `depth - 1` deep
                stack[-1] = max(stack[-1], depth)
            if stack[-1] > MAX_PICKLE_DEPTH:
                raise FormatError(f"objects nest deeper than {MAX_PICKLE_DEPTH} levels; not a state dict")
        elif kind == _MARK:
            marks.append(stack)
            stack = []
        elif kind == _POP:
            if pops < 0 or not stack:  # POP with nothing above a mark drops the mark, as pickle does
                stack = marks.pop()
            else:
                stack.pop()
        elif kind == _DUP:
            stack.append(stack[-1])
        elif kind == _PUT:
            memo[arg] = stack[-1]
        elif kind == _MEMOIZE:
            memo[len(memo)] = stack[-1]
        elif kind == _GET:
            stack.append(memo[arg])


def _pop(stack: list[int], n: int) -> list[int]:
    if len(stack) < n:
        raise FormatError("an opcode pops more than the stack holds")
    popped = stack[-n:]
    del stack[-n:]
    return popped


def _load_pickle(raw: bytes, label: str) -> Any:
    try:
        _check_bounds(raw)
        return _AllowListUnpickler(io.BytesIO(raw)).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{label}: {exc}") from None
    except FormatError as exc:
        raise FormatError(f"{label}: data.pkl: {exc}") from None
    except Exception as exc:  # hostile bytes can make the unpickler raise anything; none of it ran code
        raise FormatError(f"{label}: data.pkl is not a valid state-dict pickle: {exc!r}") from None


def _flatten(root: Any, label: str) -> Iterator[tuple[str, _Tensor]]:
    """(dotted name, tensor) for every tensor under nested dicts; each dict is visited once (no cycles)."""
    if isinstance(root, _Tensor):
        yield "tensor", root
        return
    if not isinstance(root, dict):
        raise FormatError(f"{label}: data.pkl holds a {type(root).__name__}, not a state dict")
    # An explicit stack, not recursion: a hostile pickle can nest dicts deeper than Python's stack. Names are
    # joined from the keys on the stack only at a tensor, so nesting costs no copy of a prefix per level.
    seen = {id(root)}
    names: set[str] = set()
    keys: list[str] = []  # the key of each dict on the stack below the root
    stack: list[Iterator[tuple[Any, Any]]] = [iter(root.items())]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            if keys:  # none above the root
                keys.pop()
            continue
        key, value = item
        if isinstance(value, _Tensor):
            name = ".".join([*keys, _key_text(key, label)])
            if name in names:
                raise FormatError(f"{label}: tensor name {name!r} occurs twice after flattening")
            names.add(name)
            yield name, value
        elif isinstance(value, dict) and id(value) not in seen:
            if len(stack) >= MAX_PICKLE_DEPTH:  # dicts filled after being memoized can pass _check_bounds
                raise FormatError(f"{label}: data.pkl nests dicts deeper than {MAX_PICKLE_DEPTH} levels")
            seen.add(id(value))  # each dict once: shared or cyclic references cannot blow up
            keys.append(_key_text(key, label))
            stack.append(iter(value.items()))


def _key_text(key: Any, label: str) -> str:
    """A dict key as a name component (torch's keys are strings; others as str() shows them)."""
    try:
        return key if isinstance(key, str) else str(key)
    except RecursionError:  # a tuple key holding lists nested past Python's stack
        raise FormatError(f"{label}: data.pkl has a dict key nested too deeply to name") from None
