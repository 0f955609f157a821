"""S3 end to end on a real S3 server on loopback (moto): readers, the source, the index, the crawl.

Real boto3 and pyarrow clients throughout; nothing of ours is mocked.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import pickle

import botocore.exceptions as bexc
import pyarrow.fs as pafs
import pytest
import torch
from checkpoints import BAD, COPIES, UNRELATED, mlp_state, save_model
from s3_fixtures import bucket_fixture, s3_fixture, s3_library_fixture, s3_server_fixture, upload_tree  # noqa: F401
from safetensors.torch import save_file

from jobs.crawl import crawl
from jobs.query import hash_uri, query
from pipeline.blobs import RangeReader, open_reader
from pipeline.blobs.s3 import S3Reader, translate
from pipeline.errors import BlobError, ModelIndexError, NoCheckpointError, SourceError
from pipeline.formats import safetensors
from pipeline.hashing import get_spec
from pipeline.hashing.model import hash_model
from pipeline.index import store
from pipeline.index.reader import IndexReader
from pipeline.index.writer import ShardWriter
from pipeline.sources import list_models, resolve_model, source_name
from pipeline.sources import local as local_source
from pipeline.sources import s3 as s3_source

DATA = bytes(range(256)) * 4
SPEC = "nts-v1"


def _row(i: int) -> dict:
    return {
        "source": "s3",
        "model_id": f"b/model-{i}",
        "revision": "r1",
        "spec": SPEC,
        "status": "ok",
        "code": i.to_bytes(4, "little") * 8,
    }


# -- reader ---------------------------------------------------------------------------------------


def test_reader_reads_exact_ranges_and_counts_bytes(s3, bucket):
    s3.put_object(Bucket=bucket, Key="blob.bin", Body=DATA)
    reader = open_reader(f"s3://{bucket}/blob.bin")
    assert isinstance(reader, S3Reader) and isinstance(reader, RangeReader)
    assert reader.size == len(DATA)
    assert reader.read(0, 10) == DATA[:10]
    assert reader.read(300, 5) == DATA[300:305]
    assert reader.read(len(DATA) - 4, 4) == DATA[-4:]
    assert reader.read(len(DATA), 0) == b""
    assert reader.bytes_read == 19
    with pytest.raises(BlobError, match="past end"):
        reader.read(1020, 5)
    with pytest.raises(BlobError, match="negative"):
        reader.read(-1, 4)
    assert reader.bytes_read == 19


def test_reader_pickles_without_client_and_stays_pinned(s3, bucket):
    s3.put_object(Bucket=bucket, Key="blob.bin", Body=DATA)
    reader = S3Reader(f"s3://{bucket}/blob.bin")
    reader.read(0, 8)
    payload = pickle.dumps(reader)
    assert b"testing" not in payload  # no credentials travel
    clone = pickle.loads(payload)
    assert (clone.uri, clone.size, clone.etag) == (reader.uri, reader.size, reader.etag)
    assert clone.read(512, 8) == DATA[512:520] and clone.bytes_read == 8
    s3.put_object(Bucket=bucket, Key="blob.bin", Body=DATA[::-1])
    with pytest.raises(BlobError, match="changed since listing"):
        clone.read(0, 8)  # the clone reads the version the original saw, or nothing


def test_missing_key_and_bucket_are_clear_errors(s3, bucket):
    with pytest.raises(BlobError, match=r"s3://.*/absent\.safetensors: not found"):
        _ = S3Reader(f"s3://{bucket}/absent.safetensors").size
    with pytest.raises(BlobError, match="not found"):
        S3Reader("s3://no-such-bucket-here/model.safetensors").read(0, 1)
    with pytest.raises(BlobError, match="no such bucket"):
        S3Reader("s3://no-such-bucket-here/m.bin", expected_size=10, expected_etag='"x"').read(0, 1)
    with pytest.raises(BlobError, match="not an object"):
        S3Reader(f"s3://{bucket}/")
    with pytest.raises(SourceError, match="no such bucket"):
        list(list_models("s3://no-such-bucket-here/models"))
    with pytest.raises(SourceError, match="no objects under this prefix"):
        list(list_models(f"s3://{bucket}/nothing-here"))
    with pytest.raises(SourceError, match="no such object or prefix"):
        resolve_model(f"s3://{bucket}/nothing/model.safetensors")


def test_object_changed_since_listing_is_an_error_not_other_bytes(s3, bucket):
    s3.put_object(Bucket=bucket, Key="m/blob.bin", Body=DATA)
    listed = s3.list_objects_v2(Bucket=bucket)["Contents"][0]
    uri = f"s3://{bucket}/m/blob.bin"
    pinned = S3Reader(uri)
    assert pinned.read(0, 4) == DATA[:4]
    s3.put_object(Bucket=bucket, Key="m/blob.bin", Body=DATA[::-1])  # same size, other bytes
    for reader in (S3Reader(uri, expected_size=listed["Size"], expected_etag=listed["ETag"]), pinned):
        with pytest.raises(BlobError, match="changed since listing"):
            reader.read(0, 4)
    s3.put_object(Bucket=bucket, Key="m/blob.bin", Body=DATA[:100])
    with pytest.raises(BlobError, match="changed since listing.*size 100"):
        _ = S3Reader(uri, expected_size=listed["Size"]).size


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("AccessDenied", 403, "access denied (AccessDenied: nope)"),
        ("403", 403, "access denied"),
        ("NoSuchKey", 404, "not found"),
        ("PreconditionFailed", 412, "changed since listing"),
        ("SlowDown", 503, "S3 error SlowDown: nope"),
    ],
)
def test_client_errors_translate_to_one_line_reasons(code, status, expected):
    exc = bexc.ClientError(
        {"Error": {"Code": code, "Message": "nope"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )
    error = translate(exc, "s3://b/k")
    assert isinstance(error, BlobError) and expected in str(error)
    assert isinstance(translate(exc, "s3://b/k", error=SourceError), SourceError)
    assert "no AWS credentials" in str(translate(bexc.NoCredentialsError(), "s3://b/k"))


def test_header_read_costs_the_header_not_the_weights(s3, bucket, tmp_path):
    folder = save_model(tmp_path / "wide", mlp_state(0, (256, 1024, 1024, 10)))
    upload_tree(s3, folder, bucket, "wide")
    reader = S3Reader(f"s3://{bucket}/wide/model.safetensors")
    entries = safetensors.read_entries(reader, "model.safetensors")
    header_len = int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")
    assert len(entries) == 6
    assert reader.bytes_read == 8 + header_len
    assert reader.bytes_read < reader.size / 1000  # a few hundred bytes of a ~5 MB file


# -- source ---------------------------------------------------------------------------------------


def test_listing_is_the_local_rules_under_a_prefix_across_pages(s3_library, library):
    name = s3_library["root"].removeprefix("s3://")  # bucket/lib
    local = {r.model_id: r for r in local_source.list_models(library["root"])}
    listed = list(s3_source.list_models(s3_library["root"], page_size=2))  # ~25 keys: many pages
    remote = {r.model_id.removeprefix(f"{name}/"): r for r in listed}
    assert len(listed) == len(remote) == 1 + len(COPIES) + len(UNRELATED) + len(BAD)
    assert remote.keys() == local.keys()
    assert all(r.model_id.startswith(f"{name}/") and r.source == "s3" for r in listed)
    for model_id, ref in remote.items():
        want = local[model_id]
        assert [(f.name, f.size) for f in ref.files] == [(f.name, f.size) for f in want.files]
        assert ref.arch == want.arch and len(ref.revision) == 40
        assert all(f.uri == f"s3://{name}/{model_id}/{f.name}" and f.sha256 is None for f in ref.files)
    assert remote["bad/nocheckpoint"].files == ()
    assert source_name(s3_library["root"]) == "s3"
    assert [r.model_id for r in list_models(s3_library["root"])] == [r.model_id for r in listed]


def test_folder_rules_markers_hidden_and_nesting(s3, bucket):
    body = b"weights"
    for key in (
        "zoo/",  # folder markers, as consoles create them
        "zoo/empty/",
        "zoo/a/model.safetensors",
        "zoo/a/.cache/model.safetensors",  # hidden folder: skipped
        "zoo/a/.hidden.bin",  # hidden file: skipped
        "zoo/a/b/model.bin",  # a model inside a model
        "zoo/a-b/pytorch_model.bin",  # "-" sorts before "/": listed before every "zoo/a/" key
        "zoo/docs/x/README.md",  # leaf folder without checkpoint: a model with no files
        "zoo/docs/notes.txt",  # not a leaf: not a model
        "zoo/trainer/training_args.bin",  # not weights
        "zoo-other/model.safetensors",  # beside the prefix, not under it
    ):
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    refs = {r.model_id: r for r in s3_source.list_models(f"s3://{bucket}/zoo/", page_size=3)}
    assert set(refs) == {f"{bucket}/zoo/{m}" for m in ("a", "a/b", "a-b", "docs/x", "trainer")}
    assert [f.name for f in refs[f"{bucket}/zoo/a"].files] == ["model.safetensors"]
    assert refs[f"{bucket}/zoo/docs/x"].files == () and refs[f"{bucket}/zoo/trainer"].files == ()
    with pytest.raises(NoCheckpointError, match="no files"):
        resolve_model(f"s3://{bucket}/zoo/empty")  # a folder marker only
    whole = {r.model_id for r in s3_source.list_models(f"s3://{bucket}")}
    assert whole == set(refs) | {f"{bucket}/zoo-other"}


def test_revision_is_stable_and_follows_the_objects(s3, bucket):
    s3.put_object(Bucket=bucket, Key="m/a/model.safetensors", Body=b"1" * 100)
    s3.put_object(Bucket=bucket, Key="m/a/config.json", Body=b'{"model_type": "bert"}')
    s3.put_object(Bucket=bucket, Key="m/b/model.safetensors", Body=b"2" * 100)
    first = {r.model_id: r.revision for r in list_models(f"s3://{bucket}/m")}
    assert {r.model_id: r.revision for r in list_models(f"s3://{bucket}/m")} == first
    assert resolve_model(f"s3://{bucket}/m/a").revision == first[f"{bucket}/m/a"]
    assert resolve_model(f"s3://{bucket}/m/a").arch == "bert"
    s3.put_object(Bucket=bucket, Key="m/b/model.safetensors", Body=b"3" * 100)  # same size, new ETag
    s3.put_object(Bucket=bucket, Key="m/a/README.md", Body=b"not part of identity")
    second = {r.model_id: r.revision for r in list_models(f"s3://{bucket}/m")}
    assert second[f"{bucket}/m/a"] == first[f"{bucket}/m/a"]
    assert second[f"{bucket}/m/b"] != first[f"{bucket}/m/b"]
    s3.put_object(Bucket=bucket, Key="m/a/config.json", Body=b'{"model_type": "gpt2"}')
    assert resolve_model(f"s3://{bucket}/m/a").revision != first[f"{bucket}/m/a"]


def test_sha256_is_the_checksum_s3_stores(s3, bucket):
    data = b"weights" * 1000
    s3.put_object(Bucket=bucket, Key="m/model.safetensors", Body=data, ChecksumAlgorithm="SHA256")
    s3.put_object(Bucket=bucket, Key="m/pytorch_model.bin", Body=data)  # boto3's default CRC32 only
    ref = resolve_model(f"s3://{bucket}/m")
    by_name = {f.name: f.sha256 for f in ref.files}
    assert by_name == {"model.safetensors": hashlib.sha256(data).hexdigest(), "pytorch_model.bin": None}
    held = next(s3_source.list_models(f"s3://{bucket}/m", unchanged=lambda model_id, revision: True))
    assert held.revision == ref.revision and {f.sha256 for f in held.files} == {None}  # no HEADs spent
    single = resolve_model(f"s3://{bucket}/m/model.safetensors")
    assert single.files[0].sha256 == hashlib.sha256(data).hexdigest()
    assert base64.b64decode(
        s3.head_object(Bucket=bucket, Key="m/model.safetensors", ChecksumMode="ENABLED")["ChecksumSHA256"]
    ) == hashlib.sha256(data).digest()


def test_model_at_a_folder_a_key_and_what_is_not_a_model(s3_library):
    root = s3_library["root"].removeprefix("s3://")
    folder = resolve_model(s3_library["orig"])
    assert (folder.source, folder.model_id, folder.arch) == ("s3", f"{root}/orig", "mlp")
    assert folder.revision == next(r for r in list_models(s3_library["root"]) if r.model_id == folder.model_id).revision
    single = resolve_model(f"{s3_library['orig']}/model.safetensors")
    assert single.model_id == f"{root}/orig/model.safetensors" and len(single.files) == 1
    assert [r.model_id for r in list_models(f"{s3_library['orig']}/model.safetensors")] == [single.model_id]
    with pytest.raises(NoCheckpointError, match="no checkpoint in folder.*README.md"):
        resolve_model(s3_library["nocheckpoint"])
    with pytest.raises(NoCheckpointError, match="not a checkpoint"):
        resolve_model(f"{s3_library['orig']}/config.json")
    with pytest.raises(NoCheckpointError, match="no files"):
        resolve_model(f"{s3_library['root']}/copies")
    assert [r.model_id for r in list_models(s3_library["orig"])] == [f"{root}/orig"]  # the prefix is the model
    with pytest.raises(SourceError, match="filters"):
        list(list_models(s3_library["root"], author="acme"))


def test_same_code_from_s3_as_from_the_local_folder(s3_library, library):
    for role in ("orig", "bin", "fp16"):
        here, there = hash_uri(str(library[role])), hash_uri(s3_library[role])
        assert there.code.code == here.code.code and there.code.parts == here.code.parts
        assert (there.format, there.n_params, there.bytes_read) == (here.format, here.n_params, here.bytes_read)
        assert there.bytes_read < sum(f.size for f in there.ref.files)


def test_sharded_checkpoint_on_s3(s3, bucket, tmp_path):
    state = mlp_state(0)
    names = sorted(state)
    folder = tmp_path / "sharded"
    folder.mkdir()
    halves = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, keys in halves.items():
        save_file({k: state[k].contiguous() for k in keys}, str(folder / shard))
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    upload_tree(s3, folder, bucket, "sharded")
    save_model(tmp_path / "whole", state)
    assert hash_uri(f"s3://{bucket}/sharded").code.code == hash_uri(str(tmp_path / "whole")).code.code


def test_object_replaced_between_listing_and_hashing_gives_an_error(s3, bucket, tmp_path):
    save_model(tmp_path / "m", mlp_state(0))
    upload_tree(s3, tmp_path / "m", bucket, "m")
    ref = resolve_model(f"s3://{bucket}/m")
    save_model(tmp_path / "m", mlp_state(1))
    upload_tree(s3, tmp_path / "m", bucket, "m")
    with pytest.raises(BlobError, match="changed since listing"):
        hash_model(ref, get_spec())


# -- index ----------------------------------------------------------------------------------------


def test_index_resolves_s3_from_the_environment(s3_server):
    fs, base = store.resolve("s3://some-bucket/index/")
    assert isinstance(fs, pafs.S3FileSystem) and base == "some-bucket/index"
    assert fs.region == "us-east-1"


def test_index_round_trip_on_s3_and_uncommitted_runs_are_invisible(s3, bucket):
    index = f"s3://{bucket}/index"
    assert not IndexReader.exists(index)
    with pytest.raises(ModelIndexError, match="does not exist"):
        IndexReader(index)
    with ShardWriter(index, rows_per_shard=2) as w:
        for i in range(5):
            w.add(_row(i))
    assert len(w.record.shards) == 3
    crashed = ShardWriter(index, rows_per_shard=2)
    for i in range(5, 9):
        crashed.add(_row(i))  # two shards written, never committed
    crashed.abort()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert f"index/shards/run={crashed.run_id}/part-00001.parquet" in keys
    reader = IndexReader(index)
    codes = reader.load_codes(SPEC)
    assert [c.tobytes() for c in codes.codes] == [_row(i)["code"] for i in range(5)]
    assert [r.run_id for r in reader.runs] == [w.run_id]
    assert reader.known_revisions("s3", SPEC)["b/model-0"] == ("r1", "ok")
    with pytest.raises(ModelIndexError, match="already committed"):
        ShardWriter(index, run_id=w.run_id)


def test_identities_are_read_lazily_from_s3_shards(s3, bucket):
    index = f"s3://{bucket}/index"
    with ShardWriter(index, rows_per_shard=3) as first:
        for i in range(8):
            first.add(_row(i))
    with ShardWriter(index, rows_per_shard=2) as second:
        second.add({**_row(2), "revision": "r2", "code": bytes([2]) * 32})  # model-2 re-indexed
        second.add(_row(8))
    loaded = IndexReader(index).load_codes(SPEC)
    assert len(loaded) == 9 and loaded.nbytes <= 9 * 36  # codes and row locators only
    rows = [8, 0, 4, 8]
    got = loaded.identities(rows).to_pylist()
    for row, who in zip(rows, got, strict=True):
        i = int(who["model_id"].removeprefix("b/model-"))
        want = bytes([2]) * 32 if i == 2 else _row(i)["code"]
        assert loaded.codes[row].tobytes() == want and who["source"] == "s3"
    by_model = {w["model_id"]: w["revision"] for w in loaded.identities().to_pylist()}
    assert by_model["b/model-2"] == "r2" and by_model["b/model-0"] == "r1" and len(by_model) == 9
    s3.delete_object(Bucket=bucket, Key=f"index/{first.record.shards[0].path}")  # rows of models 0..2
    with pytest.raises(ModelIndexError, match="missing"):
        loaded.identities()
    assert loaded.identities([len(loaded) - 1])["model_id"].to_pylist() == ["b/model-8"]


def test_a_run_record_is_never_replaced(s3, bucket):
    index = f"s3://{bucket}/index"
    first, second = ShardWriter(index, run_id="same-run"), ShardWriter(index, run_id="same-run")
    first.add(_row(1))
    first.commit()
    record = s3.get_object(Bucket=bucket, Key="index/runs/same-run.json")["Body"].read()
    with pytest.raises(ModelIndexError, match="already committed"):
        second.commit()  # it passed the check at open; the conditional PUT refuses it now
    assert s3.get_object(Bucket=bucket, Key="index/runs/same-run.json")["Body"].read() == record
    assert [c.tobytes() for c in IndexReader(index).load_codes(SPEC).codes] == [_row(1)["code"]]


def test_index_in_a_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(ModelIndexError, match="cannot write"):
        with ShardWriter("s3://no-such-bucket-here/index") as w:
            w.add(_row(0))


# -- crawl ----------------------------------------------------------------------------------------


def test_crawl_from_s3_into_s3_then_nothing_to_do_then_query(s3, bucket, library, ray_local):
    # Uploaded with SHA-256 checksums, and `orig` twice: the re-upload is a duplicate, found by checksum.
    upload_tree(s3, library["root"], bucket, "src", ChecksumAlgorithm="SHA256")
    upload_tree(s3, library["orig"], bucket, "src/dup/orig", ChecksumAlgorithm="SHA256")
    source, index, root = f"s3://{bucket}/src", f"s3://{bucket}/index", f"{bucket}/src"
    first = crawl(source, index, progress=False)
    n_models = 2 + len(COPIES) + len(UNRELATED) + len(BAD)
    ok = n_models - len(BAD) - 1
    assert (first.seen, first.skipped, first.hashed, first.duplicates, first.failed) == (n_models, 0, ok, 1, len(BAD))
    rows = {r["model_id"]: r for r in IndexReader(index).read_table().to_pylist()}
    assert len(rows) == n_models and {r["source"] for r in rows.values()} == {"s3"}
    assert {rows[f"{root}/orig"]["status"], rows[f"{root}/dup/orig"]["status"]} == {"ok", "duplicate"}
    assert rows[f"{root}/orig"]["code"] == rows[f"{root}/dup/orig"]["code"]
    weights = (library["orig"] / "model.safetensors").read_bytes()
    want = {"name": "model.safetensors", "size": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}
    [files] = rows[f"{root}/orig"]["files"]
    assert {k: files[k] for k in want} == want and files["etag"]
    assert "no checkpoint" in rows[f"{root}/bad/nocheckpoint"]["error"]

    second = crawl(source, index, progress=False)
    assert (second.seen, second.skipped, second.hashed + second.duplicates + second.failed) == (n_models, n_models, 0)
    assert second.runs == []  # nothing to commit

    result = query(f"s3://{bucket}/src/orig", index, k=20)
    assert result.matches[0].distance == 0
    copies = {f"{root}/copies/{c}" for c in COPIES}
    assert {m.model_id for m in result.matches[: 2 + len(copies)]} == copies | {f"{root}/orig", f"{root}/dup/orig"}
    assert {m.verdict for m in result.matches if m.model_id in copies} == {"copy"}


def test_torch_checkpoint_streamed_from_s3_matches_local(s3, bucket, tmp_path):
    state = mlp_state(3)
    buf = io.BytesIO()
    torch.save(state, buf)
    s3.put_object(Bucket=bucket, Key="t/pytorch_model.bin", Body=buf.getvalue())
    (tmp_path / "pytorch_model.bin").write_bytes(buf.getvalue())
    there = hash_uri(f"s3://{bucket}/t/pytorch_model.bin")
    here = hash_uri(str(tmp_path / "pytorch_model.bin"))
    assert there.code.code == here.code.code and there.bytes_read == here.bytes_read
