"""Hostile checkpoints from a fuzzing audit: each must fail with one of our errors, fast and in bounded
memory, never crash the process, hang, raise a foreign exception or run pickled code."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import threading
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from pipeline.blobs import BytesReader, LocalFileReader
from pipeline.errors import BlobError, FormatError, UnsafePickleError
from pipeline.formats import open_model, safetensors, torch_zip
from pipeline.formats.directory import TensorEntry
from pipeline.hashing.canonical import natural_key
from pipeline.refs import FileRef
from pipeline.sources.local import list_models, model_at

# ---- building hostile files ----


def _unicode(s: str) -> bytes:
    """A BINUNICODE opcode (surrogates kept, as pickle writes them)."""
    raw = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _zip(members: dict[str, bytes], compress: dict[str, int] | None = None) -> bytes:
    """A torch-style zip (`archive/<name>`), each member stored unless `compress` says otherwise."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for name, data in {"byteorder": b"little", **members}.items():
            info = zipfile.ZipInfo(f"archive/{name}", date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = (compress or {}).get(name, zipfile.ZIP_STORED)
            out.writestr(info, data)
    return buf.getvalue()


def _pickle_zip(data_pkl: bytes) -> bytes:
    return _zip({"data.pkl": data_pkl})


def _patch_directory(raw: bytes, member: str, field: int, value: int, fmt: str = "<L") -> bytes:
    """Overwrite one field (offset inside the central-directory entry) of a member's entry."""
    out = bytearray(raw)
    pos = out.find(b"PK\x01\x02")
    while pos >= 0:
        (name_len,) = struct.unpack("<H", out[pos + 28 : pos + 30])
        if out[pos + 46 : pos + 46 + name_len] == f"archive/{member}".encode():
            struct.pack_into(fmt, out, pos + field, value)
            return bytes(out)
        pos = out.find(b"PK\x01\x02", pos + 4)
    raise AssertionError(f"no {member} in the zip directory")


_FLAGS, _CSIZE, _FSIZE = 8, 20, 24  # central-directory fields: general purpose flags, sizes


def _read_torch(raw: bytes) -> dict[str, TensorEntry]:
    return torch_zip.read_entries(BytesReader(raw, name="ck.pt"), "ck.pt")


def _torch_save(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _safetensors(header: Any, data: bytes = b"") -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


W = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


class _Rebuilt:
    """Pickles as torch pickles `tensor`, with its size and stride replaced, or with a state that pickle
    applies to the rebuilt object (BUILD): what a hand-edited data.pkl can say."""

    def __init__(self, tensor: torch.Tensor, size_stride: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
                 state: Any = None):
        self.tensor, self.size_stride, self.state = tensor, size_stride, state

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        rebuild, args = self.tensor.__reduce_ex__(protocol)[:2]
        if self.size_stride:
            args = (args[0], args[1], *self.size_stride, *args[4:])
        return (rebuild, args) if self.state is None else (rebuild, args, self.state)


class _NeverUnpickled:
    """Stands in for the unpickler where a file must be refused before anything is unpickled."""

    def __init__(self, *_args: Any):
        raise AssertionError("data.pkl reached the unpickler")


# ---- 1, 2: nesting ----


def test_tuple_key_nested_a_million_deep_is_refused_before_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    # Unpickled, hashing this dict key overflows the C stack and kills the interpreter.
    raw = _pickle_zip(b"\x80\x02}" + b")" + b"\x85" * 1_000_000 + b"K\x01s.")
    monkeypatch.setattr(torch_zip, "_AllowListUnpickler", _NeverUnpickled)
    with pytest.raises(FormatError, match="nest deeper than 100 levels"):
        _read_torch(raw)


def test_deeply_nested_dicts_with_long_keys_are_refused_before_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    # 16 KB that used to cost 1.4 GB: one name prefix per level, each 100 bytes longer than the last.
    key = _unicode("k" * 100)
    raw = _pickle_zip(b"\x80\x02}" + key + b"q\x00" + b"}h\x00" * 3999 + b"}" + b"s" * 4000 + b".")
    monkeypatch.setattr(torch_zip, "_AllowListUnpickler", _NeverUnpickled)
    with pytest.raises(FormatError, match="nest deeper"):
        _read_torch(raw)


def test_nesting_within_the_cap_still_reads() -> None:
    state: dict[str, Any] = {"w": torch.ones(2, 2)}
    for _ in range(80):
        state = {"a": state}
    assert list(_read_torch(_torch_save(state))) == ["a." * 80 + "w"]


def test_dicts_filled_after_memoizing_cannot_nest_past_the_cap() -> None:
    # Dicts linked deepest-first through the memo: the opcode scan counts depth 1, the real tree is 150 deep.
    n = 150
    data_pkl = b"\x80\x02" + b"".join(b"}r" + struct.pack("<L", i) + b"0" for i in range(n))
    data_pkl += b"".join(
        b"j" + struct.pack("<L", i) + _unicode("k") + b"j" + struct.pack("<L", i + 1) + b"s0"
        for i in reversed(range(n - 1))
    )
    data_pkl += b"j\x00\x00\x00\x00."
    torch_zip._check_bounds(data_pkl)  # the scan alone lets it through
    with pytest.raises(FormatError, match="nests dicts deeper than 100"):
        _read_torch(_pickle_zip(data_pkl))


def test_flattening_keeps_no_prefix_per_level() -> None:
    deep: dict[str, Any] = {}
    for _ in range(99):
        deep = {"k" * 10_000: deep}
    tracemalloc.start()
    try:
        list(torch_zip._flatten(deep, "ck.pt"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # a growing prefix per level would hold 99 * 98 / 2 * 10 KB = 48 MB


def test_pickle_with_too_many_opcodes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_zip, "MAX_PICKLE_OPS", 1000)
    monkeypatch.setattr(torch_zip, "_AllowListUnpickler", _NeverUnpickled)
    with pytest.raises(FormatError, match="more than 1000 opcodes"):
        _read_torch(_pickle_zip(b"\x80\x02" + b"}" * 2000 + b"."))


# ---- 3, 4: zip members: bombs, encryption, corrupt compressed data ----


def test_byteorder_bomb_is_refused_without_inflating() -> None:
    raw = _zip({"data.pkl": b"\x80\x02}.", "byteorder": b"little" + bytes(64 * 2**20)},
               {"byteorder": zipfile.ZIP_DEFLATED})
    with pytest.raises(FormatError, match="byteorder is 67108870 bytes, above 16"):
        _read_torch(raw)
    # The same bomb declaring 6 bytes: at most 16 bytes are inflated, and they fail the checksum.
    with pytest.raises(FormatError, match="broken zip archive: Bad CRC-32"):
        _read_torch(_patch_directory(raw, "byteorder", _FSIZE, 6))


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_members_torch_cannot_inflate_are_refused(method: int) -> None:
    # zipfile inflates these with no bound per call: a 564-byte bzip2 byteorder held 400 MB.
    with pytest.raises(FormatError, match=f"uses compression method {method}; torch reads stored or deflated"):
        _read_torch(_zip({"data.pkl": b"\x80\x02}."}, {"byteorder": method}))


def test_deflated_data_pkl_is_read_and_its_inflation_bounded() -> None:
    state = _torch_save({"w": torch.ones(2, 2)})
    src = zipfile.ZipFile(io.BytesIO(state))
    members = {n.split("/", 1)[1]: src.read(n) for n in src.namelist()}
    assert list(_read_torch(_zip(members, {"data.pkl": zipfile.ZIP_DEFLATED}))) == ["w"]

    bomb = _zip({"data.pkl": bytes(64 * 2**20)}, {"data.pkl": zipfile.ZIP_DEFLATED})
    with pytest.raises(FormatError, match="deflated: at most 100 times"):
        _read_torch(bomb)
    # Declaring a small size must not make the reader inflate the whole 64 MB on the way.
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="Bad CRC-32"):
            _read_torch(_patch_directory(bomb, "data.pkl", _FSIZE, 1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_encrypted_member_is_a_format_error() -> None:
    raw = _patch_directory(_torch_save({"w": torch.ones(2)}), "data.pkl", _FLAGS, 1, "<H")
    with pytest.raises(FormatError, match="data.pkl is encrypted"):
        _read_torch(raw)


def test_corrupt_deflated_member_is_a_format_error() -> None:
    raw = _torch_save({"w": torch.ones(4, 4)})
    # Mark the stored data.pkl deflated: its bytes are no deflate stream (zlib.error).
    with pytest.raises(FormatError, match="broken zip archive: Error -3 while decompressing"):
        _read_torch(_patch_directory(raw, "data.pkl", 10, zipfile.ZIP_DEFLATED, "<H"))


def test_member_running_past_the_end_of_the_file_says_so() -> None:
    raw = _zip({"data.pkl": b"\x80\x02}."})
    for field in (_CSIZE, _FSIZE):
        raw = _patch_directory(raw, "data.pkl", field, 2**20)
    with pytest.raises(FormatError, match="member data ends early"):
        _read_torch(raw)


# ---- 5: JSON nested past Python's stack ----


def test_deeply_nested_json_is_a_format_error(tmp_path: Path) -> None:
    deep = b"[" * 3000 + b"]" * 3000
    with pytest.raises(FormatError, match="header JSON nests too deeply"):
        safetensors.read_entries(BytesReader(_safetensors(deep)))

    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(b'{"weight_map": ' + deep + b"}")
    with pytest.raises(FormatError, match="JSON nests too deeply"):
        open_model([FileRef(name=index.name, size=index.stat().st_size, uri=str(index))])


def test_deeply_nested_config_does_not_stop_a_listing(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes(b"[" * 3000 + b"]" * 3000)
    assert [m.arch for m in list_models(tmp_path)] == [None]


# ---- 6: shapes numpy cannot count ----


@pytest.mark.parametrize(
    ("shape", "match"),
    [([2**64, 0], "dimension 18446744073709551616, above 2\\*\\*62"), ([2**40, 2**40, 0], "more than 2\\*\\*62")],
)
def test_empty_tensor_with_a_huge_dimension_is_refused(shape: list[int], match: str) -> None:
    header = {"a": W, "z": {"dtype": "F32", "shape": shape, "data_offsets": [16, 16]}}
    with pytest.raises(FormatError, match=match):
        safetensors.read_entries(BytesReader(_safetensors(header, bytes(16))))


def test_torch_tensor_with_a_huge_dimension_is_refused() -> None:
    with pytest.raises(FormatError, match="'w' has dimension 18446744073709551616, above 2\\*\\*62"):
        _read_torch(_torch_save({"w": _Rebuilt(torch.ones(4), ((2**64, 0), (1, 1)))}))


def test_numel_is_exact_for_any_shape() -> None:
    assert TensorEntry("w", "F32", (2**62, 0), (0, 0)).numel == 0
    assert TensorEntry("w", "F32", (2**31, 2**31), (0, 0)).numel == 2**62
    assert TensorEntry("w", "F32", (), (0, 4)).numel == 1


# ---- 7: digits that are not ASCII ----


def test_natural_key_takes_only_ascii_digits() -> None:
    names = ["l.10.w", "l.\u00b2.w", "l.2.w", "x.\u2460.w", "1\u00b2", "l.\u0663.w"]
    ordered = sorted(names, key=natural_key)
    assert ordered.index("l.2.w") < ordered.index("l.10.w")
    assert natural_key("l.\u00b2.w") == ("l.\u00b2.w",)


# ---- 8: shards that are no regular file ----


def test_shard_path_with_a_nul_byte_is_a_blob_error(tmp_path: Path) -> None:
    with pytest.raises(BlobError, match="embedded null byte"):
        LocalFileReader(str(tmp_path / "x\x00.safetensors"))


def test_shard_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model-2.safetensors").mkdir()
    with pytest.raises(BlobError, match="not a regular file"):
        LocalFileReader(tmp_path / "model-2.safetensors")


def test_shard_that_is_a_fifo_is_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "model-2.safetensors"
    os.mkfifo(fifo)
    errors: list[Exception] = []

    def open_it() -> None:
        try:
            LocalFileReader(fifo)
        except Exception as exc:
            errors.append(exc)

    opener = threading.Thread(target=open_it, daemon=True)
    opener.start()
    opener.join(10)
    if opener.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the blocked open return
        pytest.fail("opening a FIFO waited for a writer")
    assert len(errors) == 1 and isinstance(errors[0], BlobError) and "not a regular file" in str(errors[0])


# ---- 9: names that are no valid text ----


def _not_text(text: str) -> str:
    """What the message says of a name that is no valid text."""
    return re.escape(f"{text!r} is not valid UTF-8 text")


def test_safetensors_name_with_a_lone_surrogate_is_refused() -> None:
    header = b'{"\\ud800blk.0.fc1.weight": ' + json.dumps(W).encode() + b"}"
    with pytest.raises(FormatError, match="tensor name " + _not_text("\ud800blk.0.fc1.weight")):
        safetensors.read_entries(BytesReader(_safetensors(header, bytes(16))))


def test_torch_name_with_a_lone_surrogate_is_refused() -> None:
    with pytest.raises(FormatError, match="tensor name " + _not_text("\ud800blk.0.fc1.weight")):
        _read_torch(_torch_save({"\ud800blk.0.fc1.weight": torch.ones(2, 2)}))


def test_other_names_shown_in_messages_must_be_valid_text(tmp_path: Path) -> None:
    # A global's name, a storage key or a shard's name ends up in an error row, which a crawl writes too.
    bad_global = b"\x80\x04" + _unicode("os\ud800") + _unicode("system") + b"\x93."  # STACK_GLOBAL
    with pytest.raises(FormatError, match="global " + _not_text("os\ud800.system")):
        _read_torch(_pickle_zip(bad_global))
    bad_key = b"\x80\x02(" + _unicode("storage") + b"ctorch\nFloatStorage\n" + _unicode("\ud800")
    bad_key += _unicode("cpu") + b"K\x04tQ."  # a persistent id ('storage', FloatStorage, key, 'cpu', 4)
    with pytest.raises(FormatError, match="storage key " + _not_text("\ud800")):
        _read_torch(_pickle_zip(bad_key))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"w": "\\udcff.safetensors"}}')
    with pytest.raises(FormatError, match="shard name " + _not_text("\udcff.safetensors")):
        open_model([FileRef(name=index.name, size=index.stat().st_size, uri=str(index))])


# ---- 10: BUILD on what the allow-list hands out ----


@pytest.mark.parametrize("key", sorted(torch_zip._ALLOWED), ids=lambda k: ".".join(k))
def test_build_on_an_allowed_global_is_refused_and_changes_nothing(key: tuple[str, str]) -> None:
    allowed = torch_zip._ALLOWED[key]
    before = repr(allowed)
    # GLOBAL, then BUILD with (None, {"__name__": "pwned", "code": "F16", "__defaults__": (7,)}).
    slots = _unicode("__name__") + _unicode("pwned") + _unicode("code") + _unicode("F16")
    slots += _unicode("__defaults__") + b"(K\x07t"
    data_pkl = b"\x80\x02c" + f"{key[0]}\n{key[1]}\n".encode() + b"N}(" + slots + b"u\x86b."
    with pytest.raises(UnsafePickleError, match="pickle BUILD"):
        _read_torch(_pickle_zip(data_pkl))
    assert repr(allowed) == before
    for func in (torch_zip._rebuild_tensor_v2, torch_zip._rebuild_tensor_v3, torch_zip._rebuild_parameter):
        assert func.__name__.startswith("_rebuild") and func.__defaults__ is None


def test_build_on_a_rebuilt_tensor_is_refused() -> None:
    # A frozen slots dataclass's own __setstate__ would rewrite the checked shape.
    for state in ({"shape": (-1,)}, (None, {"shape": (-1,)})):
        with pytest.raises(UnsafePickleError, match="pickle BUILD"):
            _read_torch(_torch_save({"w": _Rebuilt(torch.ones(4), state=state)}))


def test_real_state_dicts_still_build_their_metadata() -> None:
    # torch.save of a module's state dict sets `_metadata` on the OrderedDict with BUILD: still fine.
    sd = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).state_dict()
    assert b"_metadata" in _torch_save(sd)
    assert set(_read_torch(_torch_save(sd))) == set(sd)


# ---- 11: symlinked shards: a shard's *name* must stay in the model's folder; a link may lead elsewhere ----


def _sharded(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"a": torch.ones(2, 2)}, str(folder / "model-1.safetensors"))
    index = {"weight_map": {"a": "model-1.safetensors", "b": "sub/model-2.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("link", ["shard", "folder"])
def test_shards_linked_to_a_store_outside_the_model_still_read(tmp_path: Path, link: str) -> None:
    # git-annex and DVC keep the weights in a store outside the model's folder and link to them.
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"b": torch.ones(2, 2)}, str(outside / "model-2.safetensors"))
    model = tmp_path / "model"
    _sharded(model)
    if link == "shard":
        (model / "sub").mkdir()
        (model / "sub" / "model-2.safetensors").symlink_to(outside / "model-2.safetensors")
    else:
        (model / "sub").symlink_to(outside)
    assert set(open_model(model_at(model).files)) == {"a", "b"}


def test_shards_linked_within_the_model_still_read(tmp_path: Path) -> None:
    model = tmp_path / "model"
    _sharded(model)
    (model / "blobs").mkdir()
    save_file({"b": torch.ones(2, 2)}, str(model / "blobs" / "b2"))
    (model / "sub").mkdir()
    (model / "sub" / "model-2.safetensors").symlink_to(model / "blobs" / "b2")
    assert set(open_model(model_at(model).files)) == {"a", "b"}


def test_hub_cache_layout_of_links_into_blobs_still_reads(tmp_path: Path) -> None:
    # huggingface_hub's cache: snapshots/<rev>/<file> are links into blobs/, which the listing resolves.
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    save_file({"a": torch.ones(2, 2)}, str(blobs / "s1"))
    save_file({"b": torch.ones(2, 2)}, str(blobs / "s2"))
    index = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
    (blobs / "ix").write_text(json.dumps(index))
    for name, blob in [("model-1.safetensors", "s1"), ("model-2.safetensors", "s2"),
                       ("model.safetensors.index.json", "ix")]:
        (snapshot / name).symlink_to(blobs / blob)
    assert set(open_model(model_at(snapshot).files)) == {"a", "b"}

