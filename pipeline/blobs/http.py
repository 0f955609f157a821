"""HTTP(S) blobs: a file's bytes by Range requests, from a hub's `/resolve/` URLs or any server that
honours `Range`.

One HEAD learns the size, the ETag and (on a hub) the commit, without following the hub's redirect to
its CDN: the redirect itself carries `X-Linked-Size` and `X-Linked-Etag`, and its `Location` is where the
ranges are then read, so a read costs one CDN request, not a resolver call (resolvers are rate-limited).
A CDN link that expires is resolved again. Small reads go through a small block cache, so that parsing a
header or a zip directory costs a few requests, not dozens.

The token (`HF_TOKEN`, read at each request) goes only to the hub's own origin (`HF_ENDPOINT`, or
huggingface.co); it is never stored on the reader, so it cannot leak through repr, pickle or errors.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import httpx2

from pipeline.blobs import _check_range
from pipeline.errors import BlobError
from pipeline.retry import (
    DEFAULT_POLICY,
    RETRY_STATUSES,
    RetryPolicy,
    Transient,
    call,
    host_slot,
    parse_retry_after,
)
from pipeline.settings import Settings

__all__ = ["BLOCK_SIZE", "HttpReader", "hub_origins"]

BLOCK_SIZE = 16 * 1024  # reads shorter than this are served from cached aligned blocks
CACHED_BLOCKS = 16
MAX_REDIRECTS = 5
TIMEOUT_S = 60.0  # per request, to connect and between bytes read
# A range read must also finish within TIMEOUT_S plus its length at this rate: a server trickling a byte
# at a time stays within the timeout between bytes, and would hold a 16 KiB block for hours.
MIN_RATE = 64 * 1024  # bytes per second
DEFAULT_HUB = "https://huggingface.co"
_PINNED = re.compile(r"/resolve/([0-9a-f]{40})/")
_TRANSPORT_ERRORS = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)

T = TypeVar("T")
_client_lock = threading.Lock()
_client: httpx2.Client | None = None


def _session() -> httpx2.Client:
    """One pooled client per process. Not huggingface_hub's shared session: that one has no timeout,
    follows redirects, and is closed under other threads' feet after a connect error."""
    global _client
    with _client_lock:
        if _client is None:
            _client = httpx2.Client(
                follow_redirects=False,
                timeout=TIMEOUT_S,
                limits=httpx2.Limits(max_connections=64, max_keepalive_connections=16),
            )
        return _client


def _forget_client() -> None:
    global _client
    _client = None  # a forked child must not share the parent's sockets


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_client)


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme, 0)
    return (parts.scheme, (parts.hostname or "").lower(), parts.port or default)


def hub_origins(settings: Settings | None = None) -> frozenset[tuple[str, str, int]]:
    """The origins that are the hub (and so may receive `HF_TOKEN`): `HF_ENDPOINT` and huggingface.co."""
    settings = settings or Settings.from_env()
    return frozenset(_origin(u) for u in (settings.hf_endpoint or DEFAULT_HUB, DEFAULT_HUB, "https://hf.co"))


def is_hub_url(url: str) -> bool:
    """Whether `url` is on one of the hub's origins (`hub_origins`, from the environment as it is now)."""
    return _origin(url) in hub_origins()


def _redact(url: str) -> str:
    """A URL fit for messages and logs: no user info, no query (signed CDN links carry signatures)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}{parts.path}"


def _normalize_etag(etag: str | None) -> str | None:
    if not etag:
        return None
    return etag.strip().removeprefix("W/").strip('"')


class HttpReader:
    """The RangeReader of one file over HTTP.

    Args:
        url: the file's URL, typically `{endpoint}/{org}/{name}/resolve/{sha}/{file}`.
        expected_size: the size the listing promised; another size raises "changed since listing".
        expected_etag: the ETag (for hub weights, the LFS sha256) the listing promised; likewise.
        policy: retries for 429, 5xx, resets and timeouts.
        block_size: reads shorter than this are served from cached aligned blocks (0: no cache).
        timeout: seconds per request (to connect, and between bytes); a timeout is retried.

    `bytes_read` counts the body bytes fetched over the network (what the read cost, cached blocks
    included), so it may exceed the bytes returned by up to a block per small read. Nothing is fetched
    until `size` or `read` is first used.

    Raises (from `size` and `read`):
        BlobError: gated or missing repository, revision or file; a file that changed since listing; a
            server that ignores Range; retries exhausted. The message says which.
    """

    def __init__(
        self,
        url: str,
        *,
        expected_size: int | None = None,
        expected_etag: str | None = None,
        policy: RetryPolicy = DEFAULT_POLICY,
        block_size: int = BLOCK_SIZE,
        timeout: float = TIMEOUT_S,
    ):
        if urlsplit(url).scheme not in ("http", "https"):
            raise BlobError(f"{_redact(url)}: not an http(s) URL")
        self.url = url
        self.expected_size = expected_size
        self.expected_etag = _normalize_etag(expected_etag)
        self.policy = policy
        self.block_size = max(0, block_size)
        self.timeout = timeout
        self.retries = 0  # retries made so far (each one after a 429, 5xx, reset or timeout)
        self.requests = 0  # HTTP requests sent so far
        self._label = _redact(url)
        m = _PINNED.search(urlsplit(url).path)
        self._pinned = m.group(1) if m else None
        self._lock = threading.Lock()
        self._size: int | None = None
        self._etag: str | None = None
        self._commit: str | None = None
        self._location: str | None = None  # where ranges are read (the CDN link, or the URL itself)
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._bytes_read = 0

    def __repr__(self) -> str:
        return f"HttpReader({self._label!r}, size={self._size})"

    def __reduce__(self):
        # No token, no socket: the worker reads HF_TOKEN itself. What this reader learnt travels as
        # expectations, so the copy notices a file that changed in between.
        size = self._size if self._size is not None else self.expected_size
        etag = self._etag if self._etag is not None else self.expected_etag
        return (_rebuild, (self.url, size, etag, self.policy, self.block_size, self.timeout))

    # -- RangeReader -------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        if self._size is None:
            self._retrying(self._resolve, "HEAD")
        assert self._size is not None
        return self._size

    @property
    def bytes_read(self) -> int:
        return self._bytes_read

    @property
    def etag(self) -> str | None:
        """The ETag the server reported (the LFS sha256 on a hub), once resolved."""
        return self._etag

    @property
    def commit(self) -> str | None:
        """The commit the hub served (`X-Repo-Commit`), once resolved."""
        return self._commit

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset`; raises BlobError if the file is shorter."""
        _check_range(offset, length, self.size, self._label)
        if length == 0:
            return b""
        if length < self.block_size:
            return self._read_blocks(offset, length)
        return self._read_through(offset, offset + length)

    # -- reading -----------------------------------------------------------------------------------

    def _read_blocks(self, offset: int, length: int) -> bytes:
        bs, size = self.block_size, self.size
        first, last = offset // bs, (offset + length - 1) // bs
        with self._lock:
            have = {b: self._blocks[b] for b in range(first, last + 1) if b in self._blocks}
            for b in have:
                self._blocks.move_to_end(b)
        missing = [b for b in range(first, last + 1) if b not in have]
        # One request per run of adjacent missing blocks.
        runs: list[list[int]] = []
        for b in missing:
            if runs and runs[-1][-1] == b - 1:
                runs[-1].append(b)
            else:
                runs.append([b])
        for run in runs:
            begin, end = run[0] * bs, min(size, (run[-1] + 1) * bs)
            data = self._fetch(begin, end)
            for b in run:
                have[b] = data[(b - run[0]) * bs : (b - run[0] + 1) * bs]
        with self._lock:
            for b in missing:
                self._blocks[b] = have[b]
            while len(self._blocks) > CACHED_BLOCKS:
                self._blocks.popitem(last=False)
        joined = b"".join(have[b] for b in range(first, last + 1))
        start = offset - first * bs
        return joined[start : start + length]

    def _read_through(self, begin: int, end: int) -> bytes:
        """A large read: its ends from cached blocks (a header block often holds the first tensor's
        start), the rest fetched, so no byte is fetched twice."""
        bs = self.block_size
        head: list[bytes] = []
        tail: list[bytes] = []
        with self._lock:
            while bs and begin < end and (block := self._blocks.get(begin // bs)) is not None:
                base = begin // bs * bs
                piece = block[begin - base : min(end, base + bs) - base]
                head.append(piece)
                begin += len(piece)
            while bs and end > begin and (block := self._blocks.get((end - 1) // bs)) is not None:
                base = (end - 1) // bs * bs
                piece = block[max(begin, base) - base : end - base]
                tail.insert(0, piece)
                end -= len(piece)
        middle = self._fetch(begin, end) if begin < end else b""
        return b"".join([*head, middle, *tail])

    def _fetch(self, begin: int, end: int) -> bytes:
        return self._retrying(lambda: self._get_range(begin, end), f"GET bytes={begin}-{end - 1}")

    def _retrying(self, attempt: Callable[[], T], what: str) -> T:
        def counted(failure: Transient, wait: float) -> None:
            with self._lock:
                self.retries += 1

        try:
            return call(
                attempt,
                policy=self.policy,
                classify=_transport_failure,
                what=f"{self._label}: {what}",
                on_retry=counted,
            )
        except Transient as exc:
            raise BlobError(f"{self._label}: {exc.reason} (gave up after {exc.attempts} attempts)") from None

    def _get_range(self, begin: int, end: int) -> bytes:
        if self._location is None:
            self._resolve()
        location = self._location
        assert location is not None and self._size is not None
        headers = {"Range": f"bytes={begin}-{end - 1}", "Accept-Encoding": "identity", **_auth(location)}
        self._count_request()
        with host_slot(location), _session().stream("GET", location, headers=headers, timeout=self.timeout) as r:
            if location != self.url and r.status_code in (401, 403, 404, 410):
                # The CDN link expired or its content moved: resolve again on the next attempt.
                self._location = None
                raise Transient(f"CDN link refused (HTTP {r.status_code})", retry_after=0)
            if r.status_code == 416:
                raise BlobError(
                    f"{self._label}: range {begin}-{end - 1} not satisfiable: the file is shorter than "
                    f"the {self._size} bytes reported (changed since listing?)"
                )
            if r.status_code == 200:
                if begin != 0 or end != self._size:
                    raise BlobError(f"{self._label}: the server ignores Range requests (answered 200)")
            elif r.status_code != 206:
                self._raise_for(r)
            self._check_commit(r.headers.get("X-Repo-Commit"))
            total = _content_range_total(r.headers.get("Content-Range"))
            if total is not None and total != self._size:
                raise BlobError(f"{self._label}: changed since listing (now {total} bytes, was {self._size})")
            data = self._body(r, end - begin)
        with self._lock:
            self._bytes_read += len(data)
        if len(data) != end - begin:
            raise Transient(f"short body ({len(data)} of {end - begin} bytes)")
        return data

    def _body(self, r: httpx2.Response, want: int) -> bytes:
        """The body of a range response, never more than the `want` bytes asked (a server may send
        gigabytes) and within a deadline (it may send them a byte a second)."""
        length = r.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > want:
            raise BlobError(f"{self._label}: the server sends {length} bytes for a range of {want}")
        deadline = time.monotonic() + (self.timeout or TIMEOUT_S) + want / MIN_RATE
        chunks: list[bytes] = []
        got = 0
        for chunk in r.iter_bytes():
            got += len(chunk)
            if got > want:
                raise BlobError(f"{self._label}: the server sends more than the {want} bytes asked")
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise Transient(f"too slow: {got} of {want} bytes in {self.timeout or TIMEOUT_S:.0f} s "
                                f"plus {want / MIN_RATE:.1f} s")
        return b"".join(chunks)

    def _count_request(self) -> None:
        with self._lock:
            self.requests += 1

    # -- resolving ---------------------------------------------------------------------------------

    def _resolve(self) -> None:
        """HEAD the URL: size, ETag, commit and where to read ranges (a hub's LFS redirect is not followed)."""
        url = self.url
        linked_size = etag = commit = None
        for _ in range(MAX_REDIRECTS + 1):
            self._count_request()
            with host_slot(url):
                headers = {"Accept-Encoding": "identity", **_auth(url)}
                r = _session().head(url, headers=headers, timeout=self.timeout)
            commit = commit or r.headers.get("X-Repo-Commit")
            etag = etag or r.headers.get("X-Linked-Etag") or r.headers.get("ETag")
            linked_size = linked_size or r.headers.get("X-Linked-Size")
            if r.is_redirect and "Location" in r.headers:
                target = urljoin(url, r.headers["Location"])
                if linked_size is not None:  # the hub's redirect to its CDN: metadata is here, bytes there
                    self._settle(target, linked_size, etag, commit)
                    return
                url = target
                continue
            if 200 <= r.status_code < 300:
                self._settle(url, linked_size or r.headers.get("Content-Length"), etag, commit)
                return
            self._raise_for(r)
        raise BlobError(f"{self._label}: more than {MAX_REDIRECTS} redirects")

    def _settle(self, location: str, size: str | None, etag: str | None, commit: str | None) -> None:
        try:
            value = int(size) if size is not None else None
        except ValueError:
            value = None
        if value is None or value < 0:
            raise BlobError(f"{self._label}: the server did not report the file's size")
        etag = _normalize_etag(etag)
        self._check_commit(commit)
        changed = []
        known_size = self._size if self._size is not None else self.expected_size
        if known_size is not None and value != known_size:
            changed.append(f"size {value}, listed {known_size}")
        known_etag = self._etag or self.expected_etag
        if known_etag is not None and etag is not None and etag != known_etag:
            changed.append(f"ETag {etag}, listed {known_etag}")
        if changed:
            raise BlobError(f"{self._label}: changed since listing ({'; '.join(changed)})")
        self._size, self._etag, self._commit, self._location = value, etag, commit, location

    def _check_commit(self, commit: str | None) -> None:
        if commit and self._pinned and commit != self._pinned:
            raise BlobError(f"{self._label}: changed since listing (the hub serves commit {commit})")

    def _raise_for(self, r: httpx2.Response) -> None:
        """A failed response as a Transient (worth retrying) or a BlobError with the reason."""
        status, code = r.status_code, r.headers.get("X-Error-Code")
        if status in RETRY_STATUSES:
            raise Transient(f"HTTP {status}", retry_after=parse_retry_after(r.headers), host=str(r.url))
        token_set = bool(Settings.from_env().hf_token)
        if code == "GatedRepo":
            hint = "HF_TOKEN was refused: accept the model's terms on the hub with that account" if token_set \
                else "accept its terms on the hub and set HF_TOKEN"
            reason = f"gated repository: {hint}"
        elif code == "RepoNotFound":
            reason = "repository not found (deleted, renamed, or private: set HF_TOKEN)"
        elif code == "RevisionNotFound":
            reason = f"revision {self._pinned or ''} not found (changed since listing?)".replace("  ", " ")
        elif code == "EntryNotFound" or status in (404, 410):
            reason = "file not found"
        elif status == 401:
            reason = "authentication required (private or gated: set HF_TOKEN)"
        elif status == 403:
            reason = "access denied (HTTP 403): the token lacks permission" if token_set else \
                "access denied (HTTP 403)"
        else:
            reason = f"HTTP {status}"
        raise BlobError(f"{self._label}: {reason}")


def _rebuild(
    url: str, size: int | None, etag: str | None, policy: RetryPolicy, block_size: int, timeout: float
) -> HttpReader:
    return HttpReader(
        url, expected_size=size, expected_etag=etag, policy=policy, block_size=block_size, timeout=timeout
    )


def _auth(url: str) -> dict[str, str]:
    """The Authorization header for the hub's own origin, from HF_TOKEN as it is now; none elsewhere."""
    settings = Settings.from_env()
    if settings.hf_token and is_hub_url(url):
        return {"Authorization": f"Bearer {settings.hf_token}"}
    return {}


def _transport_failure(exc: BaseException) -> Transient | None:
    if isinstance(exc, _TRANSPORT_ERRORS):
        return Transient(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    return None


def _content_range_total(value: str | None) -> int | None:
    m = re.fullmatch(r"\s*bytes\s+(?:\d+-\d+|\*)/(\d+)\s*", value or "")
    return int(m.group(1)) if m else None
