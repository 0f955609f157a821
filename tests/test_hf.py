"""The hub source and HTTP range reads, against the local hub server through the real huggingface_hub
client (no mocks): listing, file metadata, partial reads, redirects, faults, gating, changes, secrets."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import pickle
import re
import shutil
import struct
import subprocess
import sys
import traceback
from pathlib import Path

import httpx2
import pytest
from checkpoints import mlp_state, save_model
from hub_fixtures import FAST, TOKEN, build_hub, write_repo

from infra.hub_server import Faults, HubServer
from jobs.query import hash_uri
from pipeline.blobs import RangeReader, open_reader
from pipeline.blobs.http import BLOCK_SIZE, HttpReader
from pipeline.errors import BlobError, NoCheckpointError, SourceError
from pipeline.formats import open_model
from pipeline.hashing import get_spec
from pipeline.hashing.model import hash_model
from pipeline.retry import RetryPolicy
from pipeline.sources import list_models, resolve_model
from pipeline.sources.hf import model_at

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    build_hub(root)
    return root


@pytest.fixture(scope="module")
def hub(hub_root: Path):
    with HubServer(hub_root, page_size=3, token=TOKEN) as server:
        yield server


@pytest.fixture(autouse=True)
def hub_env(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """Point the pipeline at the local hub (Settings read HF_ENDPOINT at call time), with no token and no
    faults; counters start at zero."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub.faults = Faults()
    hub.reset_stats()
    yield hub
    hub.faults = Faults()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _api_calls(hub: HubServer, pattern: str) -> list[str]:
    return [r["path"] for r in hub.requests if r["kind"] == "api" and re.search(pattern, r["path"])]


# -- listing ------------------------------------------------------------------------------------------


def test_listing_pages_through_every_model_with_sizes_and_sha256(hub: HubServer, hub_root: Path) -> None:
    refs = list(list_models("hf://"))
    assert [r.model_id for r in refs] == [
        "acme/big", "acme/bin", "acme/m0", "acme/m1", "acme/m2", "other/gated", "other/noweights", "zzz/tuned"
    ]
    pages = _api_calls(hub, r"^/api/models\?")
    assert len(pages) == 3 and all("cursor=" in p for p in pages[1:])  # 8 models, 3 per page
    m0 = next(r for r in refs if r.model_id == "acme/m0")
    assert m0.source == "hf" and re.fullmatch(r"[0-9a-f]{40}", m0.revision) and m0.error is None
    (f,) = m0.files  # config.json is not a checkpoint
    path = hub_root / "acme/m0/model.safetensors"
    assert (f.name, f.size, f.sha256) == ("model.safetensors", path.stat().st_size, _sha256(path))
    assert f.etag == f.sha256  # what the resolver's HEAD will report, so a changed file is caught
    assert f.uri == f"{hub.url}/acme/m0/resolve/{m0.revision}/model.safetensors"  # pinned to the revision
    assert hub.stats.file_bytes == 0  # listing reads no weights


def test_listing_filters_by_author_search_and_limit(hub: HubServer) -> None:
    assert [r.model_id for r in list_models("hf://", author="other")] == ["other/gated", "other/noweights"]
    assert [r.model_id for r in list_models("hf://other")] == ["other/gated", "other/noweights"]
    assert [r.model_id for r in list_models("hf://", search="M1")] == ["acme/m1"]
    assert [r.model_id for r in list_models("hf://", author="acme", limit=2)] == ["acme/big", "acme/bin"]
    with pytest.raises(SourceError, match="filters"):
        list(list_models("hf://acme/m0", author="acme"))


def test_card_data_gives_license_declared_bases_and_arch() -> None:
    refs = {r.model_id: r for r in list_models("hf://")}
    assert (refs["acme/m0"].license, refs["acme/m0"].declared_base) == ("apache-2.0", ())
    assert (refs["other/gated"].license, refs["other/gated"].declared_base) == ("mit", ("acme/m0",))
    assert refs["zzz/tuned"].declared_base == ("acme/m1", "acme/m2")
    assert refs["acme/m1"].license is None
    assert {r.arch for r in refs.values() if r.files} == {"mlp"}  # config.json model_type


def test_repo_without_weights_yields_no_files_and_costs_no_model_info(hub: HubServer) -> None:
    (ref,) = list_models("hf://", author="other", search="noweights")
    assert ref.files == () and ref.error is None and ref.revision
    assert not _api_calls(hub, "^/api/models/other/noweights")
    with pytest.raises(NoCheckpointError):
        model_at("hf://other/noweights")


def test_unchanged_models_cost_no_model_info(hub: HubServer) -> None:
    held = {r.model_id: r.revision for r in list_models("hf://", author="acme")}
    hub.reset_stats()
    refs = list(list_models("hf://", unchanged=lambda model_id, rev: held.get(model_id) == rev))
    assert {r.model_id: r.revision for r in refs if r.model_id in held} == held
    assert all(not r.files for r in refs if r.model_id in held)
    assert not _api_calls(hub, "^/api/models/acme/")
    assert _api_calls(hub, "^/api/models/zzz/tuned")  # not held: described


def test_one_model_by_uri_and_revision(hub: HubServer) -> None:
    ref = resolve_model("hf://acme/m1")
    assert resolve_model(f"hf://acme/m1@{ref.revision}") == ref
    assert [r.model_id for r in list_models("hf://acme/m1")] == ["acme/m1"]
    for bad in ("hf://a/b/c", "hf://acme@main", "hf://acme/m1@"):
        with pytest.raises(SourceError, match="expected"):
            model_at(bad)


# -- reading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("repo", ["acme/m0", "acme/bin"])
def test_same_code_from_the_hub_as_from_the_folder(hub_root: Path, repo: str) -> None:
    remote = hash_uri(f"hf://{repo}")
    local = hash_uri(str(hub_root / repo))
    assert remote.code == local.code
    assert remote.format == local.format and remote.n_params == local.n_params


def test_header_read_costs_a_block_and_a_tensor_costs_its_bytes(hub: HubServer, hub_root: Path) -> None:
    ref = model_at("hf://acme/big")
    (f,) = ref.files
    header = struct.unpack("<Q", (hub_root / "acme/big/model.safetensors").read_bytes()[:8])[0]
    hub.reset_stats()
    directory = open_model(ref.files)
    assert directory.bytes_read == hub.stats.file_bytes  # the reader counts what the server sent
    assert directory.bytes_read <= max(BLOCK_SIZE, 8 + header)
    assert directory.bytes_read * 100 < f.size  # 16 KiB of a 4 MiB file
    assert directory["net.0.weight"].shape == (1024, 1024)

    before = directory.bytes_read
    directory.read("net.0.weight", rows=(100, 110))  # 10 rows of 4 KiB
    assert 10 * 4096 <= directory.bytes_read - before <= 10 * 4096 + BLOCK_SIZE
    before = directory.bytes_read
    weight = directory["net.0.weight"]
    directory.read("net.0.weight")
    assert weight.nbytes - BLOCK_SIZE <= directory.bytes_read - before <= weight.nbytes
    assert directory.bytes_read == hub.stats.file_bytes


def test_lfs_files_redirect_to_the_cdn_without_the_token(
    hub: HubServer, hub_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    ref = model_at("hf://other/gated")
    reader = open_reader(ref.files[0].uri)
    assert isinstance(reader, HttpReader) and isinstance(reader, RangeReader)
    assert reader.read(0, 8) == (hub_root / "other/gated/model.safetensors").read_bytes()[:8]
    assert reader.etag == ref.files[0].sha256 and reader.commit == ref.revision
    seen = [(r["method"], r["kind"], r["status"], r["auth"]) for r in hub.requests if r["kind"] != "api"]
    assert seen == [("HEAD", "resolve", 302, True), ("GET", "cdn", 206, False)]


def test_range_edges(hub: HubServer, hub_root: Path) -> None:
    data = (hub_root / "acme/m1/model.safetensors").read_bytes()
    reader = HttpReader(model_at("hf://acme/m1").files[0].uri, block_size=0)
    assert reader.size == len(data)
    assert reader.read(len(data) - 3, 3) == data[-3:]
    assert reader.read(len(data), 0) == b""
    with pytest.raises(BlobError, match="past end"):
        reader.read(len(data) - 1, 2)
    clone = pickle.loads(pickle.dumps(reader))  # travels to Ray workers
    assert clone.read(100, 50) == data[100:150] and clone.expected_size == len(data)

    cdn = next(r["path"] for r in hub.requests if r["kind"] == "cdn")
    answer = httpx2.get(hub.cdn_url + cdn, headers={"Range": f"bytes={len(data)}-"})
    assert answer.status_code == 416 and answer.headers["Content-Range"] == f"bytes */{len(data)}"
    answer = httpx2.get(hub.cdn_url + cdn, headers={"Range": "bytes=-10"})
    assert answer.status_code == 206 and answer.content == data[-10:]
    assert answer.headers["Content-Range"] == f"bytes {len(data) - 10}-{len(data) - 1}/{len(data)}"


def test_an_expired_cdn_link_is_resolved_again(hub: HubServer, hub_root: Path) -> None:
    uri = model_at("hf://acme/m2").files[0].uri
    hub.cdn_ttl = -1  # links handed out now are already expired
    try:
        reader = HttpReader(uri, policy=FAST)
        _ = reader.size
    finally:
        hub.cdn_ttl = 3600
    assert reader.read(0, 8) == (hub_root / "acme/m2/model.safetensors").read_bytes()[:8]
    assert reader.retries == 1
    assert [r["status"] for r in hub.requests if r["kind"] != "api"] == [302, 403, 302, 206]


# -- faults -------------------------------------------------------------------------------------------

FAULTS = ("429", "500", "502", "503", "reset")


def test_faults_on_reads_are_retried_and_counted(hub: HubServer, hub_root: Path) -> None:
    data = (hub_root / "acme/m0/model.safetensors").read_bytes()
    uri = model_at("hf://acme/m0").files[0].uri
    hub.faults = Faults(rate=0.3, kinds=FAULTS, seed=5, retry_after=0, paths=r"/resolve/|^/cdn/")
    reader = HttpReader(uri, policy=FAST, block_size=0)
    got = b"".join(reader.read(at, min(8192, len(data) - at)) for at in range(0, len(data), 8192))
    assert got == data
    faults = hub.stats.faults
    assert sum(faults.values()) >= 5 and len(faults) >= 3, faults
    assert reader.retries == sum(faults.values())  # one retry per injected fault, none lost


def test_faults_during_crawl_give_the_same_code(hub: HubServer) -> None:
    clean = hash_uri("hf://acme/m1").code
    hub.faults = Faults(rate=0.3, kinds=FAULTS, seed=2, retry_after=0, paths=r"^/api/models/|/resolve/|^/cdn/")
    (ref,) = list_models("hf://acme/m1", policy=FAST)
    assert ref.error is None
    assert hash_model(ref, get_spec(None)).code == clean  # the crawl's readers: default retry policy
    assert hub.stats.total_faults > 0


def test_listing_pages_are_retried_by_the_client(hub: HubServer) -> None:
    # One fault: the client's own backoff costs at least 1 s per retry.
    hub.faults = Faults(rate=1.0, kinds=("503", "reset"), seed=1, limit=1, paths=r"^/api/models\?.*cursor=")
    assert len(list(list_models("hf://", unchanged=lambda *_: True))) == 8
    assert hub.stats.total_faults == 1 and len(_api_calls(hub, r"^/api/models\?")) == 4  # 3 pages + 1 retry


def test_timeouts_are_retried(hub: HubServer, hub_root: Path) -> None:
    uri = model_at("hf://acme/m2").files[0].uri
    hub.faults = Faults(rate=1.0, kinds=("slow",), delay=2.0, limit=1, paths="^/cdn/")
    reader = HttpReader(uri, policy=FAST, timeout=0.5)
    assert reader.read(0, 64) == (hub_root / "acme/m2/model.safetensors").read_bytes()[:64]
    assert reader.retries == hub.stats.faults["slow"] == 1


def test_a_body_longer_than_the_range_is_refused_not_read(hub: HubServer) -> None:
    uri = model_at("hf://acme/m2").files[0].uri
    hub.faults = Faults(rate=1.0, kinds=("overlong",), paths="^/cdn/")
    reader = HttpReader(uri, policy=FAST, block_size=0)
    with pytest.raises(BlobError, match="sends 1048640 bytes for a range of 64"):
        reader.read(0, 64)
    assert reader.bytes_read == 0 and reader.retries == 0  # refused at its headers, not retried


def test_a_trickling_body_meets_a_deadline(hub: HubServer) -> None:
    uri = model_at("hf://acme/m2").files[0].uri
    hub.faults = Faults(rate=1.0, kinds=("trickle",), delay=0.05, paths="^/cdn/")
    reader = HttpReader(uri, policy=RetryPolicy(attempts=2, base_delay=0.0), block_size=0, timeout=0.5)
    # 64 bytes at 20 per second: within the timeout between bytes, past the 0.5 s + 64 / MIN_RATE deadline.
    with pytest.raises(BlobError, match=r"too slow: \d+ of 64 bytes.*gave up after 2 attempts"):
        reader.read(0, 64)


def test_exhausted_retries_are_a_blob_error(hub: HubServer) -> None:
    uri = model_at("hf://acme/m0").files[0].uri
    hub.faults = Faults(rate=1.0, kinds=("500",), paths="/resolve/")
    reader = HttpReader(uri, policy=RetryPolicy(attempts=3, base_delay=0.0))
    with pytest.raises(BlobError, match=r"HTTP 500 \(gave up after 3 attempts\)"):
        _ = reader.size
    assert hub.stats.requests["resolve"] == 3


def test_a_failing_model_does_not_stop_the_listing(hub: HubServer, hub_root: Path) -> None:
    hub.faults = Faults(rate=1.0, kinds=("503",), paths="^/api/models/acme/m1/")
    gone = write_repo(hub_root, "zzz/gone", seed=9)
    try:
        refs = []
        for ref in list_models("hf://", policy=FAST):
            refs.append(ref)
            if ref.model_id == "other/noweights":  # its page lists zzz/gone: delete it before model_info
                shutil.rmtree(gone)
    finally:
        if gone.exists():
            shutil.rmtree(gone)
    by_id = {r.model_id: r for r in refs}
    assert len(refs) == 9
    assert by_id["acme/m1"].files == () and "HTTP 503 (gave up after 8 attempts)" in by_id["acme/m1"].error
    assert by_id["zzz/gone"].files == () and "repository not found" in by_id["zzz/gone"].error
    assert all(r.error is None for r in refs if r.model_id not in ("acme/m1", "zzz/gone"))


# -- access and errors --------------------------------------------------------------------------------


def test_gated_repo_needs_the_token(hub: HubServer, hub_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = model_at("hf://other/gated")  # the API is public, as on the hub: sizes and sha256 are known
    assert ref.files[0].sha256 == _sha256(hub_root / "other/gated/model.safetensors")
    with pytest.raises(BlobError, match=r"gated repository: accept its terms on the hub and set HF_TOKEN"):
        hash_model(ref, get_spec(None))
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(BlobError, match="HF_TOKEN was refused"):
        _ = open_reader(ref.files[0].uri).size
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hash_model(ref, get_spec(None)).code == hash_uri(str(hub_root / "other/gated")).code


def test_missing_repo_revision_and_file(hub: HubServer) -> None:
    with pytest.raises(SourceError, match="repository not found"):
        model_at("hf://acme/absent")
    with pytest.raises(SourceError, match="revision 0{40} not found"):
        model_at(f"hf://acme/m0@{'0' * 40}")
    ref = model_at("hf://acme/m0")
    with pytest.raises(BlobError, match="file not found"):
        _ = HttpReader(ref.files[0].uri.replace("model.safetensors", "absent.safetensors")).size
    with pytest.raises(BlobError, match="revision 0{40} not found"):
        _ = HttpReader(ref.files[0].uri.replace(ref.revision, "0" * 40)).size
    with pytest.raises(BlobError, match="repository not found"):
        _ = HttpReader(ref.files[0].uri.replace("acme/m0", "acme/absent")).size
    assert hub.stats.requests["resolve"] == 3  # none of these is retried


def test_a_file_changed_after_listing_is_an_error_never_a_wrong_code(tmp_path: Path) -> None:
    write_repo(tmp_path, "acme/live", seed=0)
    write_repo(tmp_path, "acme/early", seed=0)
    with HubServer(tmp_path) as hub, pytest.MonkeyPatch.context() as env:
        env.setenv("HF_ENDPOINT", hub.url)
        live, early = model_at("hf://acme/live"), model_at("hf://acme/early")
        reader = open_reader(early.files[0].uri)
        _ = reader.size  # resolved (and its CDN link taken) before the change
        travelled = pickle.dumps(reader)
        for name in ("live", "early"):
            save_model(tmp_path / "acme" / name, mlp_state(5))
        for ref in (live, early):
            with pytest.raises(BlobError, match="changed since listing"):
                hash_model(ref, get_spec(None))
        with pytest.raises(BlobError, match="changed since listing"):
            reader.read(0, 8)  # the CDN no longer has those bytes; resolving again shows the change
        with pytest.raises(BlobError, match="changed since listing"):
            pickle.loads(travelled).read(0, 8)
        unpinned = live.files[0].uri.replace(live.revision, "main")
        with pytest.raises(BlobError, match="changed since listing.*ETag"):
            _ = HttpReader(unpinned, expected_etag=live.files[0].sha256).size
        assert model_at("hf://acme/live").revision != live.revision  # a new commit


def test_the_token_never_leaks(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "hf_SecretThatIsWrong987654321"
    monkeypatch.setenv("HF_TOKEN", secret)
    ref = model_at("hf://other/gated")
    reader = open_reader(ref.files[0].uri)
    with pytest.raises(BlobError) as caught:
        _ = reader.size
    hub.faults = Faults(rate=1.0, kinds=("500",), paths="^/api/models/acme/m0")
    (failed,) = list_models("hf://acme/m0", policy=RetryPolicy(attempts=2, base_delay=0))
    texts = [
        str(caught.value), repr(caught.value), "".join(traceback.format_exception(caught.value)),
        repr(reader), str(failed), caplog.text,
    ]
    assert failed.error and "HF_TOKEN was refused" in texts[0]
    for text in texts:
        assert secret not in text
    for blob in (pickle.dumps(reader), pickle.dumps(caught.value), pickle.dumps(failed)):
        assert secret.encode() not in blob
    assert any(r["auth"] for r in hub.requests)  # it was sent, to the hub only


def test_listing_pages_on_another_host_get_no_token(hub_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub sends its token to whatever URL a page's `Link: next` names.
    with HubServer(hub_root, page_size=3) as elsewhere, \
            HubServer(hub_root, page_size=3, token=TOKEN, next_base=elsewhere.url) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        ids = [r.model_id for r in list_models("hf://", unchanged=lambda model_id, revision: True)]
        assert len(ids) > 3  # the pages on the other host were read
        assert any(r["auth"] for r in hub.requests)
        assert elsewhere.requests and not any(r["auth"] for r in elsewhere.requests)


def test_a_hub_asking_to_wait_for_days_is_given_up_on(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.faults = Faults(rate=1.0, kinds=("429",), retry_after=999_999, paths=r"^/api/models\?")
    with pytest.raises(SourceError, match="asks to wait 999999 s"):
        list(list_models("hf://"))
    hub.faults = Faults(rate=1.0, kinds=("429",), retry_after=999_999, paths="^/api/models/acme/m0")
    (ref,) = list_models("hf://acme/m0")
    assert ref.error and "wait" in ref.error


def test_a_trickling_hub_api_meets_a_deadline(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # The client's timeout holds between bytes; a byte every 50 ms would hold a model_info for minutes.
    import pipeline.sources.hf as hf

    monkeypatch.setattr(hf, "API_DEADLINE_S", 0.5)
    hub.faults = Faults(rate=1.0, kinds=("trickle",), delay=0.05, paths="^/api/models/acme/m0")
    (ref,) = list_models("hf://acme/m0", policy=RetryPolicy(attempts=2, base_delay=0.0))
    assert ref.error and "ReadTimeout" in ref.error


def test_a_model_info_that_names_another_model_or_leaves_the_repo_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "hostile"
    write_repo(root, "evil/spoof", meta={"id": "acme/m0"})  # model_info answers for another repository
    write_repo(root, "evil/dots", meta={"extra_siblings": ["../../acme/m0/model.safetensors", "/abs.safetensors"]})
    with HubServer(root) as hostile, pytest.MonkeyPatch.context() as env:
        env.setenv("HF_ENDPOINT", hostile.url)
        (spoofed,) = list_models("hf://evil/spoof")
        assert spoofed.model_id == "evil/spoof" and "described 'acme/m0' when asked for 'evil/spoof'" in spoofed.error
        (dots,) = list_models("hf://evil/dots")
        assert not dots.error and [f.name for f in dots.files] == ["model.safetensors"]


# -- the server as the client sees it -----------------------------------------------------------------


def test_hf_hub_download_works_against_the_server(hub: HubServer, hub_root: Path, tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download

    path = hf_hub_download("acme/m0", "model.safetensors", endpoint=hub.url, cache_dir=tmp_path, token=False)
    assert Path(path).read_bytes() == (hub_root / "acme/m0/model.safetensors").read_bytes()


def test_listing_sorts_and_returns_the_fields_the_client_parses(hub: HubServer) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=False)
    newest_first = [m.id for m in api.list_models(sort="last_modified", expand=["lastModified"])]
    assert newest_first[0] == "zzz/tuned" and newest_first[-1] == "acme/m0" and len(newest_first) == 8
    (full,) = api.list_models(search="tuned", full=True, cardData=True)
    assert full.sha and full.last_modified.year == 2099 and full.card_data.license == "mit"
    assert [s.rfilename for s in full.siblings] == ["config.json", "model.safetensors"]
    assert full.siblings[0].size is None  # listings give names only, as on the hub
    (bare,) = api.list_models(search="tuned")
    assert bare.sha is None and bare.siblings is None and "license:mit" in bare.tags


def test_server_runs_as_a_script(hub_root: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "infra.hub_server", str(hub_root), "--port", "0", "--page-size", "2"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        url = re.search(r"hub at (http://\S+)", proc.stdout.readline()).group(1)
        page = httpx2.get(f"{url}/api/models", params={"author": "acme"}, timeout=10)
        assert [m["id"] for m in page.json()] == ["acme/big", "acme/bin"] and 'rel="next"' in page.headers["Link"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_fault_config_is_checked() -> None:
    with pytest.raises(ValueError):
        Faults(rate=1.5)
    with pytest.raises(ValueError):
        Faults(kinds=("418",))


def test_secrets_a_server_echoes_are_redacted_from_rows_reports_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.entry import guarded
    from pipeline.index.rows import error_row
    from pipeline.refs import ModelRef
    from pipeline.search.report import Stage2
    from pipeline.verify.behavior import Verdict

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "awsSecretKey123")
    echoed = (f"illegal header line: X Bad Bearer {TOKEN}; key awsSecretKey123; cannot reach S3 at "
              "http://user:pa55@127.0.0.1:1/x; hf_SomeoneElsesToken99")
    row = error_row(ModelRef("hf", "acme/m0", "", ()), "spec", echoed)["error"]
    verdict = Verdict("agreement", None, "error", {}, reason=echoed).reason
    stage2 = Stage2("error", reason=echoed).reason
    for text in (row, verdict, stage2):
        assert "illegal header line" in text and "127.0.0.1:1/x" in text
        for secret in (TOKEN, "awsSecretKey123", "user:pa55", "hf_SomeoneElsesToken99"):
            assert secret not in text

    def fail() -> int:
        raise SourceError(echoed)

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert guarded(fail) == 2
    assert "illegal header line" in err.getvalue() and TOKEN not in err.getvalue()
