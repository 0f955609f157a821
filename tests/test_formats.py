"""Checkpoint formats over real files written by torch.save and safetensors: values, laziness, hostility."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.blobs import BytesReader, LocalFileReader
from pipeline.errors import FormatError, NoCheckpointError, UnsafePickleError
from pipeline.formats import CHECKPOINT_SUFFIXES, TensorDirectory, open_model, safetensors, torch_zip
from pipeline.refs import FileRef

DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for code, dtype in DTYPES.items():
        x = torch.randn(5, 3, generator=g) * 100
        sd[f"t_{code.lower()}"] = x > 0 if dtype == torch.bool else x.to(dtype)
    sd["scalar"] = torch.tensor(1.5)
    sd["empty"] = torch.zeros(0, 4)
    return sd


def _expected(t: torch.Tensor) -> np.ndarray:
    # BF16 is widened to float32 by the reader, which is exact.
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()


def _ref(path: Path, root: Path | None = None) -> FileRef:
    name = path.relative_to(root).as_posix() if root else path.name
    return FileRef(name=name, size=path.stat().st_size, uri=str(path))


def _save(sd: dict[str, Any], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def _assert_matches(d: TensorDirectory, sd: dict[str, torch.Tensor]) -> None:
    assert set(d) == set(sd)
    for name, t in sd.items():
        got = d.read(name)
        assert d[name].shape == tuple(t.shape)
        assert got.dtype == _expected(t).dtype
        np.testing.assert_array_equal(got, _expected(t), strict=True)


# ---- values ----


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin", "ck.pt", "ck.pth"])
def test_every_dtype_round_trips_exactly(tmp_path: Path, filename: str) -> None:
    sd = _state_dict()
    d = open_model([_ref(_save(sd, tmp_path / filename))])
    assert d.format == ("safetensors" if filename.endswith(".safetensors") else "torch_zip")
    for code, dtype in DTYPES.items():
        assert d[f"t_{code.lower()}"].dtype == code, dtype
    _assert_matches(d, sd)
    assert d.n_params == sum(t.numel() for t in sd.values())


def test_bin_and_safetensors_of_one_state_dict_read_the_same(tmp_path: Path) -> None:
    sd = _state_dict(seed=3)
    st = open_model([_ref(_save(sd, tmp_path / "model.safetensors"))])
    pt = open_model([_ref(_save(sd, tmp_path / "pytorch_model.bin"))])
    assert set(st) == set(pt)
    for name in st:
        assert (st[name].dtype, st[name].shape) == (pt[name].dtype, pt[name].shape)
        np.testing.assert_array_equal(st.read(name), pt.read(name), strict=True)
        if st[name].shape and st[name].shape[0] >= 3:
            np.testing.assert_array_equal(st.read(name, rows=(1, 3)), pt.read(name, rows=(1, 3)), strict=True)


def test_torch_extra_dtypes_views_parameters_and_shared_storage(tmp_path: Path) -> None:
    base = torch.arange(20, dtype=torch.float32).reshape(5, 4)
    sd = OrderedDict(
        view=base[2:],  # storage_offset 8 into a storage shared with `base`
        base=base,
        param=torch.nn.Parameter(torch.ones(3, dtype=torch.float16)),
        u16=torch.arange(6).reshape(2, 3).to(torch.uint16),  # written with _rebuild_tensor_v3
        f8=torch.tensor([0.5, -2.0], dtype=torch.float8_e4m3fn),
    )
    d = torch_zip.open(LocalFileReader(_save(sd, tmp_path / "ck.pt")), "ck.pt")
    np.testing.assert_array_equal(d.read("view"), base[2:].numpy())
    np.testing.assert_array_equal(d.read("base"), base.numpy())
    assert d["view"].span[0] == d["base"].span[0] + 8 * 4
    np.testing.assert_array_equal(d.read("param"), np.ones(3, dtype=np.float16))
    assert d["u16"].dtype == "U16"
    np.testing.assert_array_equal(d.read("u16"), sd["u16"].numpy())
    assert (d["f8"].dtype, d["f8"].nbytes) == ("F8_E4M3", 2)


def test_nested_state_dicts_flatten_to_dotted_names(tmp_path: Path) -> None:
    inner = _state_dict()
    ckpt = {
        "state_dict": inner,
        "model": {"encoder": {"w": torch.ones(2, 2)}, "head": torch.zeros(3)},
        "epoch": 7, "lr": 0.1, "name": "run-1", "nothing": None, "history": [1, 2, 3],
    }
    d = open_model([_ref(_save(ckpt, tmp_path / "last.pt"))])
    expected = {f"state_dict.{k}" for k in inner} | {"model.encoder.w", "model.head"}
    assert set(d) == expected
    np.testing.assert_array_equal(d.read("state_dict.t_f32"), inner["t_f32"].numpy())
    np.testing.assert_array_equal(d.read("model.encoder.w"), np.ones((2, 2), dtype=np.float32))


# ---- laziness ----


def test_safetensors_open_reads_only_the_header(tmp_path: Path) -> None:
    sd = {"big": torch.randn(1000, 256), "small": torch.randn(7, 3)}
    path = _save(sd, tmp_path / "model.safetensors")
    reader = LocalFileReader(path)
    d = safetensors.open(reader)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert reader.bytes_read == 8 + n
    np.testing.assert_array_equal(d.read("small"), sd["small"].numpy())
    assert reader.bytes_read == 8 + n + 7 * 3 * 4
    np.testing.assert_array_equal(d.read("big", rows=(10, 12)), sd["big"][10:12].numpy())
    assert reader.bytes_read == 8 + n + 7 * 3 * 4 + 2 * 256 * 4
    assert d.bytes_read == reader.bytes_read


def test_torch_zip_open_reads_directory_and_pickle_only(tmp_path: Path) -> None:
    sd = {"big": torch.randn(1000, 256), "small": torch.randn(7, 3)}
    path = _save(sd, tmp_path / "pytorch_model.bin")
    reader = LocalFileReader(path)
    d = torch_zip.open(reader, "pytorch_model.bin")
    opened = reader.bytes_read
    assert opened < 4096 < reader.size  # the 1 MB storage was not touched
    np.testing.assert_array_equal(d.read("small"), sd["small"].numpy())
    assert reader.bytes_read == opened + 7 * 3 * 4
    np.testing.assert_array_equal(d.read("big", rows=(10, 12)), sd["big"][10:12].numpy())
    assert reader.bytes_read == opened + 7 * 3 * 4 + 2 * 256 * 4


# ---- sharded checkpoints and choosing files ----


def _write_sharded(folder: Path, suffix: str) -> tuple[dict[str, torch.Tensor], list[Path]]:
    sd = _state_dict(seed=5)
    names = sorted(sd)
    shards = [dict((k, sd[k]) for k in names[:4]), dict((k, sd[k]) for k in names[4:])]
    stem = "model" if suffix == ".safetensors" else "pytorch_model"
    weight_map, paths = {}, []
    for i, shard in enumerate(shards, 1):
        shard_name = f"{stem}-{i:05d}-of-00002{suffix}"
        paths.append(_save(shard, folder / shard_name))
        weight_map.update({k: shard_name for k in shard})
    index = folder / f"{stem}{suffix}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return sd, [index, *paths]


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_sharded_checkpoint_merges_shards_per_the_index(tmp_path: Path, suffix: str) -> None:
    sd, paths = _write_sharded(tmp_path, suffix)
    d = open_model([_ref(p) for p in paths])
    _assert_matches(d, sd)
    assert {d[name].file for name in d} == {p.name for p in paths[1:]}


def test_sharded_checkpoint_resolves_shards_beside_the_index(tmp_path: Path) -> None:
    sub = tmp_path / "unet"
    sub.mkdir()
    sd, paths = _write_sharded(sub, ".safetensors")
    d = open_model([_ref(paths[0], tmp_path)])  # only the index is passed
    _assert_matches(d, sd)
    assert d[next(iter(d))].file.startswith("unet/")


def test_index_that_misplaces_a_tensor_is_rejected(tmp_path: Path) -> None:
    _, paths = _write_sharded(tmp_path, ".safetensors")
    index = json.loads(paths[0].read_text())
    name, shard = next(iter(index["weight_map"].items()))
    index["weight_map"][name] = next(s for s in set(index["weight_map"].values()) if s != shard)
    paths[0].write_text(json.dumps(index))
    with pytest.raises(FormatError, match=f"index says tensor '{name}'"):
        open_model([_ref(p) for p in paths])


def test_index_naming_a_file_outside_the_model_is_rejected(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../../etc/model.safetensors"}}))
    with pytest.raises(FormatError, match="escapes"):
        open_model([_ref(index)])


def test_safetensors_preferred_and_trainer_files_ignored(tmp_path: Path) -> None:
    sd = _state_dict()
    _save(sd, tmp_path / "model.safetensors")
    _save({k: v + 1 for k, v in sd.items() if v.dtype != torch.bool}, tmp_path / "pytorch_model.bin")
    torch.save({"args": "x", "step": 3}, tmp_path / "training_args.bin")
    (tmp_path / "config.json").write_text("{}")
    files = [_ref(p) for p in sorted(tmp_path.iterdir())]
    d = open_model(files)
    assert d.format == "safetensors"
    _assert_matches(d, sd)
    d = open_model([f for f in files if f.name != "model.safetensors"])
    assert d.format == "torch_zip"
    assert set(d) == {k for k, v in sd.items() if v.dtype != torch.bool}


def test_duplicate_tensor_across_files_is_rejected(tmp_path: Path) -> None:
    a = _save({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    b = _save({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    with pytest.raises(FormatError, match="'w' is in both"):
        open_model([_ref(a), _ref(b)])


def test_no_checkpoint_among_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NoCheckpointError):
        open_model([_ref(tmp_path / "config.json")])
    with pytest.raises(NoCheckpointError):
        open_model([])


def test_checkpoint_suffixes_cover_the_design() -> None:
    for name in ["m.safetensors", "pytorch_model.bin", "a.pt", "a.pth", "model.safetensors.index.json"]:
        assert name.endswith(CHECKPOINT_SUFFIXES)
    assert not "config.json".endswith(CHECKPOINT_SUFFIXES)


# ---- broken and lying safetensors ----


def _raw_safetensors(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def _open_raw(raw: bytes) -> TensorDirectory:
    return safetensors.open(BytesReader(raw, name="model.safetensors"))


def test_safetensors_truncated_file(tmp_path: Path) -> None:
    raw = _save({"w": torch.randn(64, 64)}, tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(FormatError, match="past end of data"):
        _open_raw(raw[:-10])
    with pytest.raises(FormatError, match="past end of file"):
        _open_raw(raw[:40])
    with pytest.raises(FormatError, match="too short"):
        _open_raw(raw[:5])


def test_safetensors_header_claiming_100_gb_reads_nothing_more() -> None:
    reader = BytesReader(struct.pack("<Q", 100 * 2**30) + b"{}")
    with pytest.raises(FormatError, match="above the .*cap"):
        safetensors.open(reader)
    assert reader.bytes_read == 8


W = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        (b'{"w": {"dtype": "F32", "sha', b"", "not valid JSON"),
        (b"\xff\xfe{}", b"", "not valid JSON"),
        ([1, 2], b"", "not an object"),
        (b'{"w": 1, "w": 2}', b"", "repeats a key"),
        ({"w": {**W, "dtype": "F33"}}, bytes(16), "unknown dtype 'F33'"),
        ({"w": {**W, "dtype": "F4", "data_offsets": [0, 2]}}, bytes(2), "unsupported dtype F4"),
        ({"w": {**W, "shape": [2, -2]}}, bytes(16), "bad shape"),
        ({"w": {**W, "shape": [True, 4]}}, bytes(16), "bad shape"),
        ({"w": {**W, "data_offsets": [16, 0]}}, bytes(16), "bad data_offsets"),
        ({"w": {**W, "data_offsets": [0, 12]}}, bytes(16), "hold 12 bytes, but F32\\[2, 2\\] needs 16"),
        ({"w": {**W, "data_offsets": [1000, 1016]}}, bytes(16), "past end of data"),
        ({"w": W, "v": {**W, "data_offsets": [8, 24]}}, bytes(24), "overlap"),
        ({"__metadata__": {"a": 1}, "w": W}, bytes(16), "__metadata__"),
    ],
)
def test_safetensors_bad_headers(header: Any, data: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        _open_raw(_raw_safetensors(header, data))


def test_safetensors_metadata_and_holes_are_fine() -> None:
    header = {"__metadata__": {"format": "pt"}, "w": {**W, "data_offsets": [16, 32]}}
    data = bytes(16) + np.arange(4, dtype="<f4").tobytes()
    d = _open_raw(_raw_safetensors(header, data))
    assert list(d) == ["w"]
    np.testing.assert_array_equal(d.read("w"), np.arange(4, dtype=np.float32).reshape(2, 2))


# ---- broken, legacy and lying torch zips ----


def _open_torch(raw: bytes) -> TensorDirectory:
    return torch_zip.open(BytesReader(raw, name="pytorch_model.bin"))


def _central_directory(raw: bytes) -> int:
    eocd = raw.rfind(b"PK\x05\x06")
    return struct.unpack("<L", raw[eocd + 16 : eocd + 20])[0]


def test_torch_zip_truncated(tmp_path: Path) -> None:
    raw = _save({"w": torch.randn(64, 64)}, tmp_path / "pytorch_model.bin").read_bytes()
    for cut in (len(raw) // 2, len(raw) - 30, 3):
        with pytest.raises(FormatError):
            _open_torch(raw[:cut])


def test_torch_zip_corrupt_central_directory(tmp_path: Path) -> None:
    raw = bytearray(_save({"w": torch.randn(8, 8)}, tmp_path / "pytorch_model.bin").read_bytes())
    cd = _central_directory(bytes(raw))
    raw[cd : cd + 4] = b"XXXX"
    with pytest.raises(FormatError, match="broken zip"):
        _open_torch(bytes(raw))


def test_torch_zip_directory_lying_about_a_storage_offset(tmp_path: Path) -> None:
    raw = bytearray(_save({"w": torch.randn(8, 8)}, tmp_path / "pytorch_model.bin").read_bytes())
    pos = _central_directory(bytes(raw))
    while raw[pos : pos + 4] == b"PK\x01\x02":  # walk the central directory to data/0's entry
        name_len, extra_len, comment_len = struct.unpack("<3H", raw[pos + 28 : pos + 34])
        if raw[pos + 46 : pos + 46 + name_len].endswith(b"/data/0"):
            (offset,) = struct.unpack("<L", raw[pos + 42 : pos + 46])
            raw[pos + 42 : pos + 46] = struct.pack("<L", offset + 7)
            break
        pos += 46 + name_len + extra_len + comment_len
    else:
        pytest.fail("no data/0 entry")
    with pytest.raises(FormatError, match="bad local header"):
        _open_torch(bytes(raw))


def test_torch_zip_compressed_storage_is_rejected(tmp_path: Path) -> None:
    src = zipfile.ZipFile(_save({"w": torch.randn(8, 8)}, tmp_path / "ck.pt"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info))
    with pytest.raises(FormatError, match="compressed"):
        _open_torch(buf.getvalue())


def test_legacy_pickle_checkpoint_is_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "old.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(FormatError, match="legacy pickle checkpoint .* not supported; not unpickled"):
        open_model([_ref(path)])


def test_non_contiguous_tensor_is_rejected_with_reason(tmp_path: Path) -> None:
    path = _save({"t": torch.randn(3, 4).t()}, tmp_path / "ck.pt")
    with pytest.raises(FormatError, match="not C-contiguous"):
        open_model([_ref(path)])


def test_zip_without_data_pkl_is_not_a_checkpoint() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        out.writestr("readme.txt", "hello")
    with pytest.raises(FormatError, match="no <archive>/data.pkl"):
        _open_torch(buf.getvalue())


# ---- malicious pickles ----


class _Call:
    """Pickles as `func(*args)`: what an attacker puts in data.pkl."""

    def __init__(self, func: Callable[..., Any], *args: Any):
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


def _zip_checkpoint(path: Path, data_pkl: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as out:
        out.writestr("archive/data.pkl", data_pkl)
        out.writestr("archive/byteorder", "little")
        out.writestr("archive/version", "3\n")
    return path


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("attack", ["os.system", "builtins.exec", "io.open", "nested"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, attack: str, protocol: int) -> None:
    pwned = tmp_path / "pwned"
    payload: Any = {
        "os.system": _Call(os.system, f"touch {pwned}"),
        "builtins.exec": _Call(exec, f"open({str(pwned)!r}, 'w').close()"),
        "io.open": _Call(open, str(pwned), "w"),
        "nested": OrderedDict(w=torch.ones(2), b=_Call(os.system, f"touch {pwned}")),
    }[attack]
    path = tmp_path / "pytorch_model.bin"
    if attack == "nested":  # a genuine torch checkpoint with real tensors, written by torch.save
        torch.save({"model": payload}, path, pickle_protocol=protocol)
        func: Callable[..., Any] = os.system
    else:
        _zip_checkpoint(path, pickle.dumps(payload, protocol=protocol))
        func = payload.func
    module = "__builtin__" if protocol < 3 and func.__module__ == "builtins" else func.__module__
    forbidden = f"{module}.{func.__name__}"  # posix.system, __builtin__.exec, io.open
    assert func.__name__.encode() in path.read_bytes()  # the payload really is in data.pkl
    with pytest.raises(UnsafePickleError, match=f"forbidden global {forbidden}"):
        open_model([_ref(path)])
    assert not pwned.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [("torch", "load"), ("torch._utils", "_rebuild_tensor"), ("torch.utils.collect_env", "run")],
)
def test_torch_globals_outside_the_allow_list_are_refused(tmp_path: Path, module: str, name: str) -> None:
    data_pkl = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."  # GLOBAL, EMPTY_TUPLE, REDUCE
    path = _zip_checkpoint(tmp_path / "ck.pt", data_pkl)
    with pytest.raises(UnsafePickleError, match=f"forbidden global {module}.{name}"):
        open_model([_ref(path)])


@pytest.mark.parametrize(
    "data_pkl",
    # garbage, a list, a persistent id that is no storage reference
    [b"not a pickle", b"\x80\x02]q\x00.", b"\x80\x02X\x01\x00\x00\x00xQ."],
)
def test_pickle_that_is_no_state_dict_is_a_format_error(tmp_path: Path, data_pkl: bytes) -> None:
    path = _zip_checkpoint(tmp_path / "ck.pt", data_pkl)
    with pytest.raises(FormatError) as info:
        open_model([_ref(path)])
    assert not isinstance(info.value, UnsafePickleError)
