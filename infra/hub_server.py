"""A local Hugging Face hub for tests, the demo and benchmarks: a folder of repositories served over the
HTTP API that `huggingface_hub` (2.4) calls, with byte counters and fault injection.

Layout: `ROOT/<org>/<name>/` holds one repository's files (subfolders allowed, dotfiles hidden). An
optional `ROOT/<org>/<name>/.hub.json` holds what the hub knows beside the files: `license`,
`base_model` (a string or a list), `gated` (true, "auto" or "manual"), `lastModified`, `createdAt`,
`tags`, `pipeline_tag`, `library_name`, `downloads`, `likes`.

The revision is a digest of the repository's file names and contents (and of `.hub.json`), so every
change on disk is a new commit. The server keeps no history: a revision it reported before still
resolves, to the *current* files, whose `X-Repo-Commit` and `ETag` then differ from what the client was
told; that is how a file changed between listing and reading shows. A revision never reported is a 404.

Endpoints, as the client sends them:
    GET       /api/models?search=&author=&limit=&sort=&expand=&full=&cardData=&config=&cursor=
    GET       /api/models/{org}/{name}[/revision/{rev}][?blobs=true][&expand=...]
    HEAD|GET  /{org}/{name}/resolve/{rev}/{path}     weights (LFS) answer 302 to the CDN
    HEAD|GET  /cdn/{sha256}?exp=&sig=                signed, expiring; on a second port, so it is
                                                     another origin, as the hub's CDN is
Listings page by `Link: <...&cursor=...>; rel="next"`. Errors carry `X-Error-Code` (RepoNotFound,
RevisionNotFound, EntryNotFound, GatedRepo) as on the hub. Ranges: one `bytes=a-b`, `a-` or `-n` per
request (206 with Content-Range; 416 when unsatisfiable).

Run: `python -m infra.hub_server ROOT --port 8080`, or from Python:

    with HubServer(root, token="hf_test", faults=Faults(rate=0.3, seed=1)) as hub:
        api = HfApi(endpoint=hub.url)
        ...
        hub.stats.file_bytes   # body bytes served from /resolve/ and the CDN
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import random
import re
import secrets
import socket
import struct
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

# What the hub stores with Git LFS (its default .gitattributes), plus anything large.
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npz", ".npy",
    ".pkl", ".pickle", ".tflite", ".ot", ".pb", ".joblib", ".zip", ".tar", ".gz",
)
LFS_MIN_BYTES = 10 * 2**20
FAULT_KINDS = frozenset({"429", "500", "502", "503", "reset", "slow", "overlong", "trickle"})
_OVERLONG = 1 << 20  # bytes an "overlong" response sends past what was asked
PATH_KINDS = ("api", "resolve", "cdn", "other")
META_FILE = ".hub.json"
CDN_TTL_S = 3600.0
_CHUNK = 1 << 20
_LIST_FIELDS = ("_id", "id", "modelId", "likes", "downloads", "private", "tags", "pipeline_tag",
                "library_name", "createdAt")
_FULL_FIELDS = _LIST_FIELDS + ("author", "sha", "lastModified", "gated", "disabled", "siblings")


@dataclass(frozen=True)
class Faults:
    """Faults injected into a fraction of responses, drawn from a seeded RNG so runs repeat.

    Attributes:
        rate: the fraction of matching requests that get a fault (0 to 1).
        kinds: drawn uniformly: "429" (with `Retry-After`), "500", "502", "503", "reset" (the socket is
            closed with no response), "slow" (answered normally after `delay` seconds); on file reads
            also "overlong" (1 MiB more than the range, and a Content-Length that says so) and "trickle"
            (the body a byte at a time, `delay` seconds apart; API answers too).
        seed: the RNG seed; setting new faults restarts the sequence.
        retry_after: seconds sent in a 429's `Retry-After` (None: no header).
        delay: seconds a "slow" response waits.
        paths: a regex searched in the request path (query included); None matches every request.
        limit: inject at most this many faults, then none (None: no limit).
    """

    rate: float = 0.0
    kinds: tuple[str, ...] = ("429", "500", "reset")
    seed: int = 0
    retry_after: int | None = 1
    delay: float = 0.5
    paths: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"fault rate must lie in [0, 1], not {self.rate}")
        unknown = set(self.kinds) - FAULT_KINDS
        if unknown or not self.kinds:
            raise ValueError(f"fault kinds must be among {sorted(FAULT_KINDS)}, got {list(self.kinds)}")


@dataclass
class Stats:
    """What the server did since start (or `reset_stats`): requests and body bytes per path kind
    ("api", "resolve", "cdn", "other"), faults per kind, responses per status."""

    requests: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)

    @property
    def file_bytes(self) -> int:
        """Body bytes of repository files served, through /resolve/ and the CDN (not API JSON)."""
        return self.bytes["resolve"] + self.bytes["cdn"]

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def total_faults(self) -> int:
        return sum(self.faults.values())

    def copy(self) -> Stats:
        return Stats(Counter(self.requests), Counter(self.bytes), Counter(self.faults), Counter(self.statuses))


@dataclass(frozen=True)
class _File:
    name: str  # posix path inside the repository
    path: Path
    size: int
    sha256: str
    blob_id: str  # the git object id: of the LFS pointer for LFS files, of the content otherwise
    lfs: bool
    pointer_size: int


@dataclass(frozen=True)
class _Repo:
    id: str
    files: dict[str, _File]
    sha: str
    meta: dict[str, Any]
    last_modified: str
    created_at: str
    config: dict[str, Any] | None


class HubServer:
    """A hub over `root`, on 127.0.0.1: `start()`, `url`, `stop()`, or `with HubServer(root) as hub:`.

    Args:
        root: the folder of `<org>/<name>/` repositories; read on every request, so tests may change it.
        host: the address to bind (loopback by default).
        port, cdn_port: 0 picks free ports.
        page_size: models per listing page.
        token: the token that opens gated repositories (`Authorization: Bearer <token>`).
        faults: faults to inject (changeable while running: `hub.faults = Faults(...)`).
        cdn_ttl: seconds a CDN link stays valid.
        next_base: the base URL a listing's next-page `Link` names (default: this hub's `url`); tests point
            it at another host, as a hub whose pages live elsewhere would.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        cdn_port: int = 0,
        page_size: int = 100,
        token: str | None = None,
        faults: Faults | None = None,
        cdn_ttl: float = CDN_TTL_S,
        next_base: str | None = None,
    ):
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        self.root = Path(root)
        self.host, self._port, self._cdn_port = host, port, cdn_port
        self.page_size = page_size
        self.token = token
        self.cdn_ttl = cdn_ttl
        self.next_base = next_base
        self._lock = threading.Lock()
        self._faults = faults or Faults()
        self._rng = random.Random(self._faults.seed)
        self._injected = 0  # faults injected under the current config
        self._stats = Stats()
        self._log: deque[dict[str, Any]] = deque(maxlen=10_000)
        self._digests: dict[tuple[str, int, int, int, int], tuple[str, str]] = {}
        self._revisions: dict[str, set[str]] = {}  # repo id -> every sha reported
        self._blobs: dict[str, Path] = {}  # sha256 -> a file with that content, for the CDN
        self._secret = secrets.token_bytes(16)
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> HubServer:
        if self._servers:
            return self
        for port, role in ((self._port, "hub"), (self._cdn_port, "cdn")):
            httpd = _Server((self.host, port), _Handler)
            httpd.hub, httpd.role = self, role
            thread = threading.Thread(
                target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"hub-server-{role}", daemon=True
            )
            thread.start()
            self._servers.append(httpd)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for httpd in self._servers:
            httpd.shutdown()
            httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The endpoint to give `HfApi(endpoint=...)` or `HF_ENDPOINT`."""
        return self._base(0)

    @property
    def cdn_url(self) -> str:
        return self._base(1)

    def _base(self, i: int) -> str:
        if not self._servers:
            raise RuntimeError("hub server is not started")
        host, port = self._servers[i].server_address[:2]
        return f"http://{host}:{port}"

    # -- faults and counters -----------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        with self._lock:
            self._faults = faults
            self._rng = random.Random(faults.seed)
            self._injected = 0

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters."""
        with self._lock:
            return self._stats.copy()

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = Stats()
            self._log.clear()

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The latest requests (up to 10,000): method, path, kind, range, auth (bool), status, fault."""
        with self._lock:
            return [dict(e) for e in self._log]

    def _draw_fault(self, path: str) -> _Drawn | None:
        """The fault drawn for this request (kind and config), or None."""
        with self._lock:
            f = self._faults
            if f.rate <= 0 or (f.paths is not None and not re.search(f.paths, path)):
                return None
            if f.limit is not None and self._injected >= f.limit:
                return None
            if self._rng.random() >= f.rate:
                return None
            kind = self._rng.choice(f.kinds)
            self._stats.faults[kind] += 1
            self._injected += 1
            return _Drawn(kind, f)

    # Counted before the bytes go out, so a client that has its answer finds it counted.
    def _arrived(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._stats.requests[entry["kind"]] += 1
            self._log.append(entry)

    def _answered(self, entry: dict[str, Any], status: int) -> None:
        with self._lock:
            entry["status"] = status
            self._stats.statuses[status] += 1

    def _sent(self, kind: str, n: int) -> None:
        with self._lock:
            self._stats.bytes[kind] += n

    def authorized(self, header: str | None) -> bool:
        if not self.token or not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].strip().encode(), self.token.encode())

    # -- repositories --------------------------------------------------------------------------------

    def repo_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            f"{org.name}/{repo.name}"
            for org in self.root.iterdir()
            if org.is_dir() and not org.name.startswith(".")
            for repo in org.iterdir()
            if repo.is_dir() and not repo.name.startswith(".")
        )

    def repo(self, repo_id: str) -> _Repo | None:
        """The repository as it is on disk now (file digests cached by stat), or None."""
        parts = repo_id.split("/")
        if len(parts) != 2 or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            return None
        folder = self.root / parts[0] / parts[1]
        if not folder.is_dir():
            return None
        files: dict[str, _File] = {}
        mtimes: list[float] = []
        for path in sorted(_walk(folder)):
            st = path.stat()
            sha256, git_oid = self._digest(path, st)
            name = path.relative_to(folder).as_posix()
            lfs = name.lower().endswith(LFS_SUFFIXES) or st.st_size >= LFS_MIN_BYTES
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {st.st_size}\n"
            blob_id = _git_oid(pointer.encode()) if lfs else git_oid
            files[name] = _File(name, path, st.st_size, sha256, blob_id, lfs, len(pointer) if lfs else 0)
            mtimes.append(st.st_mtime)
        meta_path = folder / META_FILE
        meta_bytes = meta_path.read_bytes() if meta_path.is_file() else b""
        try:
            meta = json.loads(meta_bytes) if meta_bytes else {}
        except ValueError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        digest = hashlib.sha1(repo_id.encode() + b"\n")
        for f in files.values():
            digest.update(f"{f.name}\0{f.sha256}\n".encode())
        digest.update(meta_bytes)
        sha = digest.hexdigest()
        with self._lock:
            self._revisions.setdefault(repo_id, set()).add(sha)
            for f in files.values():
                self._blobs[f.sha256] = f.path
        newest = max(mtimes, default=folder.stat().st_mtime)
        oldest = min(mtimes, default=newest)
        return _Repo(
            id=repo_id,
            files=files,
            sha=sha,
            meta=meta,
            last_modified=str(meta.get("lastModified") or _iso(newest)),
            created_at=str(meta.get("createdAt") or _iso(oldest)),
            config=_config(files.get("config.json")),
        )

    def knows_revision(self, repo: _Repo, rev: str) -> bool:
        with self._lock:
            return rev in ("main", repo.sha) or rev in self._revisions.get(repo.id, ())

    def blob_path(self, sha256: str) -> Path | None:
        """A file whose content has this sha256 now, or None (it changed or went away)."""
        with self._lock:
            path = self._blobs.get(sha256)
        if path is None or not path.is_file():
            return None
        return path if self._digest(path, path.stat())[0] == sha256 else None

    def _digest(self, path: Path, st: os.stat_result) -> tuple[str, str]:
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        with self._lock:
            hit = self._digests.get(key)
        if hit:
            return hit
        sha256 = hashlib.sha256()
        git = hashlib.sha1(b"blob %d\0" % st.st_size)
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                sha256.update(chunk)
                git.update(chunk)
        value = (sha256.hexdigest(), git.hexdigest())
        with self._lock:
            self._digests[key] = value
        return value

    def sign(self, sha256: str, expires: int) -> str:
        return hmac.new(self._secret, f"{sha256}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def model_json(self, repo: _Repo, *, fields: tuple[str, ...] | None, blobs: bool = False) -> dict[str, Any]:
        """A model as the API returns it: every field when `fields` is None, else only those (and id)."""
        org = repo.id.split("/")[0]
        gated = repo.meta.get("gated") or False
        card = {k: repo.meta[k] for k in ("license", "base_model") if repo.meta.get(k) is not None}
        tags = list(repo.meta.get("tags") or [])
        if any(n.endswith(".safetensors") for n in repo.files):
            tags.append("safetensors")
        if any(n.endswith((".bin", ".pt", ".pth")) for n in repo.files):
            tags.append("pytorch")
        if card.get("license"):
            tags.append(f"license:{card['license']}")
        bases = card.get("base_model")
        for base in [bases] if isinstance(bases, str) else bases or []:
            tags.append(f"base_model:{base}")
        siblings = []
        for f in repo.files.values():
            sib: dict[str, Any] = {"rfilename": f.name}
            if blobs:
                sib.update(size=f.size, blobId=f.blob_id)
                if f.lfs:
                    sib["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": f.pointer_size}
            siblings.append(sib)
        # A hostile hub, for tests: file names listed that lie outside the repository, another model's id.
        siblings += [{"rfilename": name} for name in repo.meta.get("extra_siblings", [])]
        claimed = str(repo.meta.get("id", repo.id))
        every: dict[str, Any] = {
            "_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24],
            "id": claimed,
            "modelId": claimed,
            "author": org,
            "sha": repo.sha,
            "lastModified": repo.last_modified,
            "createdAt": repo.created_at,
            "private": False,
            "gated": "manual" if gated is True else gated,
            "disabled": False,
            "downloads": int(repo.meta.get("downloads", 0)),
            "likes": int(repo.meta.get("likes", 0)),
            "tags": tags,
            "pipeline_tag": repo.meta.get("pipeline_tag"),
            "library_name": repo.meta.get("library_name"),
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(f.size for f in repo.files.values()),
        }
        if card:
            every["cardData"] = card
        if repo.config is not None:
            every["config"] = repo.config
        if fields is None:
            return every
        return {k: every[k] for k in ("_id", "id", *fields) if k in every}

    def list_json(self, query: dict[str, list[str]]) -> tuple[list[dict[str, Any]], int | None]:
        """One listing page and the offset of the next, or None on the last page."""
        author = _one(query, "author")
        search = (_one(query, "search") or "").lower()
        ids = [
            i for i in self.repo_ids()
            if (not author or i.split("/")[0] == author) and (not search or search in i.lower())
        ]
        repos = [r for i in ids if (r := self.repo(i)) is not None]
        gated = _one(query, "gated")
        if gated is not None:
            repos = [r for r in repos if bool(r.meta.get("gated")) == _truthy(gated)]
        sort = _one(query, "sort")
        if sort in ("lastModified", "createdAt"):
            key = "last_modified" if sort == "lastModified" else "created_at"
            repos.sort(key=lambda r: (_timestamp(getattr(r, key)), r.id), reverse=True)
        elif sort in ("downloads", "likes", "trendingScore"):
            repos.sort(key=lambda r: (int(r.meta.get(sort, 0) or 0), r.id), reverse=True)
        limit = _one(query, "limit")
        if limit is not None:
            repos = repos[: max(0, int(limit))]
        expand = query.get("expand")
        if expand:
            fields: tuple[str, ...] = tuple(expand)
        else:
            fields = _FULL_FIELDS if _truthy(_one(query, "full")) else _LIST_FIELDS
            fields += ("cardData",) if _truthy(_one(query, "cardData")) else ()
            fields += ("config",) if _truthy(_one(query, "config")) else ()
        offset = _decode_cursor(_one(query, "cursor"))
        page = repos[offset : offset + self.page_size]
        following = offset + self.page_size
        return [self.model_json(r, fields=fields) for r in page], following if following < len(repos) else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    hub: HubServer
    role: str

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (a timeout on a slow fault) leaves a broken pipe: not worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


class _Drawn:
    def __init__(self, kind: str, faults: Faults):
        self.kind, self.faults = kind, faults


class _ResetConnection(Exception):
    """Raised inside a handler to drop the connection with no response."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients pool connections
    timeout = 10  # idle keep-alive connections close on their own
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm meets the client's
    # delayed ACK and every response waits ~40 ms.
    disable_nagle_algorithm = True
    server_version = "modelhash-hub/1"
    _body_fault: _Drawn | None = None  # an "overlong" or "trickle" fault drawn for this request
    server: Any

    # -- plumbing ------------------------------------------------------------------------------------

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass  # the request log (HubServer.requests) replaces stderr noise

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except _ResetConnection:
            self.close_connection = True
            try:
                # SO_LINGER 0: close sends a TCP RST, as a dropped proxy connection does.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            except OSError:
                pass

    def send_response(self, code: int, message: str | None = None) -> None:
        self.hub._answered(self._entry, code)
        super().send_response(code, message)

    def _write(self, data: bytes) -> None:
        self.hub._sent(self._entry["kind"], len(data))
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _refuse(self) -> None:
        self._begin(head=False)
        self.close_connection = True  # the body, if any, is not read
        self._send_json(405, {"error": f"{self.command} not supported"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

    def _begin(self, head: bool) -> None:
        self._head = head
        self._entry: dict[str, Any] = {
            "method": self.command,
            "path": self.path,
            "kind": _path_kind(urlsplit(self.path).path, self.server.role),
            "range": self.headers.get("Range"),
            "auth": self.headers.get("Authorization") is not None,
            "status": None,
            "fault": None,
        }
        self.hub._arrived(self._entry)

    def _serve(self, head: bool) -> None:
        self._begin(head)
        split = urlsplit(self.path)
        drawn = self.hub._draw_fault(self.path)
        self._body_fault = None
        if drawn is not None:
            self._entry["fault"] = drawn.kind
            if drawn.kind == "reset":
                raise _ResetConnection
            if drawn.kind == "slow":
                time.sleep(drawn.faults.delay)
            elif drawn.kind in ("overlong", "trickle"):
                self._body_fault = drawn  # served by _send_file
            else:
                return self._fault(drawn)
        if self.server.role == "cdn":
            self._cdn(split.path, parse_qs(split.query))
        else:
            self._route(split.path, parse_qs(split.query, keep_blank_values=True))

    def _fault(self, drawn: _Drawn) -> None:
        status = int(drawn.kind)
        headers = {}
        if status == 429 and drawn.faults.retry_after is not None:
            headers["Retry-After"] = str(drawn.faults.retry_after)
        self._send_json(status, {"error": f"injected fault {status}"}, headers)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self._head:
            return
        if self._body_fault is not None and self._body_fault.kind == "trickle":
            for i in range(len(body)):
                self._write(body[i : i + 1])
                time.sleep(self._body_fault.faults.delay)
        else:
            self._write(body)

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send_json(status, {"error": message}, headers)

    # -- the hub -----------------------------------------------------------------------------------

    def _route(self, path: str, query: dict[str, list[str]]) -> None:
        parts = [unquote(p) for p in path.split("/")[1:]]
        if parts[:2] == ["api", "models"]:
            if len(parts) == 2 or (len(parts) == 3 and parts[2] == ""):
                return self._list(query)
            if len(parts) in (4, 6) and (len(parts) == 4 or parts[4] == "revision"):
                return self._info(f"{parts[2]}/{parts[3]}", parts[5] if len(parts) == 6 else None, query)
            return self._error(404, None, f"no such API route: {path}")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        return self._error(404, None, f"not found: {path}")

    def _list(self, query: dict[str, list[str]]) -> None:
        try:
            page, following = self.hub.list_json(query)
        except ValueError as exc:
            return self._error(400, "BadRequest", f"bad listing query: {exc}")
        headers = {}
        if following is not None:
            rest = [(k, v) for k, vs in query.items() if k != "cursor" for v in vs]
            rest.append(("cursor", _encode_cursor(following)))
            headers["Link"] = f'<{self.hub.next_base or self.hub.url}/api/models?{urlencode(rest)}>; rel="next"'
        self._send_json(200, page, headers)

    def _info(self, repo_id: str, rev: str | None, query: dict[str, list[str]]) -> None:
        repo = self.hub.repo(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
        if rev is not None and not self.hub.knows_revision(repo, rev):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        expand = query.get("expand")
        fields = tuple(expand) if expand else None
        self._send_json(200, self.hub.model_json(repo, fields=fields, blobs=_truthy(_one(query, "blobs"))))

    def _resolve(self, repo_id: str, rev: str, name: str) -> None:
        repo = self.hub.repo(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
        if repo.meta.get("gated") and not self.hub.authorized(self.headers.get("Authorization")):
            return self._error(
                401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it."
            )
        if not self.hub.knows_revision(repo, rev):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        f = repo.files.get(name)
        if f is None:
            return self._error(404, "EntryNotFound", f"Entry not found: {name}")
        common = {"X-Repo-Commit": repo.sha, "Access-Control-Expose-Headers": "X-Repo-Commit, X-Linked-Size"}
        if f.lfs:
            expires = int(time.time() + self.hub.cdn_ttl)
            query = urlencode({"exp": expires, "sig": self.hub.sign(f.sha256, expires)})
            headers = {
                **common,
                "Location": f"{self.hub.cdn_url}/cdn/{f.sha256}?{query}",
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(f.size),
                "ETag": f'"{f.blob_id}"',
                "Content-Length": "0",
            }
            self.send_response(302)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            return
        self._send_file(f.path, {**common, "ETag": f'"{f.blob_id}"'}, _content_type(name))

    # -- the CDN -----------------------------------------------------------------------------------

    def _cdn(self, path: str, query: dict[str, list[str]]) -> None:
        m = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
        if not m:
            return self._error(404, None, "NoSuchKey")
        sha256 = m.group(1)
        try:
            expires = int(_one(query, "exp") or "0")
        except ValueError:
            expires = 0
        if not hmac.compare_digest(_one(query, "sig") or "", self.hub.sign(sha256, expires)):
            return self._error(403, None, "AccessDenied: bad signature")
        if time.time() > expires:
            return self._error(403, None, "AccessDenied: Request has expired")
        blob = self.hub.blob_path(sha256)
        if blob is None:
            return self._error(404, None, "NoSuchKey")
        self._send_file(blob, {"ETag": f'"{sha256}"'}, "application/octet-stream")

    def _send_file(self, path: Path, headers: dict[str, str], content_type: str) -> None:
        try:
            fh = open(path, "rb")
        except OSError:
            return self._error(404, "EntryNotFound", "Entry not found")
        with fh:
            size = os.fstat(fh.fileno()).st_size
            span = _parse_range(self.headers.get("Range"), size)
            if span == "unsatisfiable":
                return self._send_json(416, {"error": "Requested Range Not Satisfiable"},
                                       {"Content-Range": f"bytes */{size}"})
            self.send_response(200 if span is None else 206)
            start, end = span or (0, size)
            if span is not None:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            fault = self._body_fault.kind if self._body_fault is not None else None
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(end - start + (_OVERLONG if fault == "overlong" else 0)))
            self.send_header("Accept-Ranges", "bytes")
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if self._head:
                return
            fh.seek(start)
            left = end - start
            while left > 0:
                chunk = fh.read(1 if fault == "trickle" else min(_CHUNK, left))
                if not chunk:  # the file shrank under us: the client sees a short body
                    self.close_connection = True
                    return
                self._write(chunk)
                left -= len(chunk)
                if fault == "trickle":
                    time.sleep(self._body_fault.faults.delay)
            if fault == "overlong":
                self._write(bytes(_OVERLONG))


# -- helpers -------------------------------------------------------------------------------------------


def _walk(folder: Path):
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _timestamp(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _config(f: _File | None) -> dict[str, Any] | None:
    """The part of config.json the hub returns (`model_type`, `architectures`)."""
    if f is None or f.size > 1 << 20:
        return None
    try:
        data = json.loads(f.path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {k: data[k] for k in ("model_type", "architectures") if k in data}


def _one(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[-1] if values else None


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset}).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        return int(json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))["o"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"bad cursor {cursor!r}") from exc


def _path_kind(path: str, role: str) -> str:
    if role == "cdn":
        return "cdn"
    if path.startswith("/api/"):
        return "api"
    if "/resolve/" in path:
        return "resolve"
    return "other"


def _content_type(name: str) -> str:
    return "application/json" if name.endswith(".json") else "application/octet-stream"


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """[start, end) of a single `bytes=` range; None to send the whole file; "unsatisfiable" for 416."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or not (m.group(1) or m.group(2)):
        return None  # malformed or several ranges: ignored, as RFC 9110 allows
    if m.group(1):
        start = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else size - 1
        if start >= size or last < start:
            return "unsatisfiable"
        return start, min(last, size - 1) + 1
    suffix = int(m.group(2))
    if suffix == 0 or size == 0:
        return "unsatisfiable"
    return max(0, size - suffix), size


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m infra.hub_server", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="folder of <org>/<name>/ repositories")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="hub port (default: a free one)")
    parser.add_argument("--cdn-port", type=int, default=0, help="CDN port (default: a free one)")
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--token", default=None, help="the token that opens gated repositories")
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--fault-kinds", default="429,500,reset", help="comma-separated, among " +
                        ",".join(sorted(FAULT_KINDS)))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    faults = Faults(rate=args.fault_rate, kinds=tuple(args.fault_kinds.split(",")), seed=args.seed)
    hub = HubServer(args.root, host=args.host, port=args.port, cdn_port=args.cdn_port,
                    page_size=args.page_size, token=args.token, faults=faults)
    with hub:
        print(f"hub at {hub.url} (CDN {hub.cdn_url}) serving {len(hub.repo_ids())} repositories "
              f"from {hub.root}; HF_ENDPOINT={hub.url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
