"""The Hugging Face hub as a source, through `huggingface_hub.HfApi`.

URIs: `hf://` lists the hub (narrowed by `author`, `search`, `limit`); `hf://org` lists one author;
`hf://org/name` and `hf://org/name@rev` name one model.

A listing asks for each model's sha and file names (`expand`), then, for a model with checkpoint files,
one `model_info(files_metadata=True)` pinned to that sha: sizes, LFS sha256, license, base models and
config. The client retries listing pages itself but not `model_info`, so that call runs under
`pipeline.retry`. A model that fails (gone, gated for the API, retries exhausted) is yielded with no files
and the reason in `ModelRef.error`: one bad repository never stops a crawl. Files are `/resolve/` URLs
pinned to the revision, which `blobs.open_reader` reads by Range (pipeline.blobs.http).

The endpoint and token come from `HF_ENDPOINT` and `HF_TOKEN` (pipeline.settings), read at call time;
a token saved by `hf auth login` is not used, so that listing and reading see the same credentials.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator

import httpx2
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import ModelInfo
from huggingface_hub.utils import _http as hf_http
from huggingface_hub.utils import parse_ratelimit_headers

from pipeline.blobs.http import is_hub_url
from pipeline.errors import NoCheckpointError, SourceError
from pipeline.refs import FileRef, ModelRef, is_checkpoint_name, stays_inside
from pipeline.retry import DEFAULT_POLICY, RETRY_STATUSES, RetryPolicy, Transient, call, parse_retry_after
from pipeline.settings import Settings

__all__ = ["DEFAULT_ENDPOINT", "SOURCE", "list_models", "model_at"]

SOURCE = "hf"
DEFAULT_ENDPOINT = "https://huggingface.co"
# Enough to pick models and pin them; file sizes and sha256 need model_info (listings give names only).
LIST_EXPAND = ["sha", "lastModified", "siblings"]
INFO_TIMEOUT_S = 60.0
_TRANSPORT_ERRORS = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)

LISTING_TIMEOUT_S = 60.0  # per request of the listing and model_info calls
# What one hub API response (a listing page, a model's info) may take in all and weigh: the timeout above
# holds between bytes only, so a server sending a byte a minute, or gigabytes, would hold the crawl's driver.
API_DEADLINE_S = 120.0
API_MAX_BYTES = 64 << 20  # a model with 100k files is described in a few MB


def list_models(
    uri: str = "hf://",
    *,
    author: str | None = None,
    search: str | None = None,
    limit: int | None = None,
    unchanged: Callable[[str, str], bool] | None = None,
    settings: Settings | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> Iterator[ModelRef]:
    """Every model of the hub that matches, in the hub's order.

    Args:
        uri: `hf://`, `hf://org` (that author's models) or `hf://org/name[@rev]` (one model).
        author, search, limit: the hub's filters (`search` matches part of the id).
        unchanged: `unchanged(model_id, revision)` is true for a model the caller holds already and
            will skip: it is yielded with that revision and no files, and costs no `model_info` call
            (what makes a nightly crawl cheap).
        settings: endpoint and token (default: `Settings.from_env()` now).
        policy: retries of `model_info`.

    Yields:
        One ModelRef per model; `files` holds only checkpoint files (none when the repository has none);
        `error` says why a model could not be described.

    Raises:
        SourceError: a malformed URI, or the listing itself failed (after the client's own retries).
    """
    settings = settings or Settings.from_env()
    repo_id, revision = _parse(uri)
    if repo_id and "/" in repo_id:
        if author or search or limit is not None:
            raise SourceError(f"{uri}: filters (author, search, limit) apply to hub listings, not to one model")
        yield _describe(_api(settings), repo_id, revision, policy)
        return
    if repo_id:  # hf://org
        if author and author != repo_id:
            raise SourceError(f"{uri}: author {author!r} contradicts the URI")
        author = repo_id
    api = _api(settings)
    listing = iter(api.list_models(author=author, search=search, limit=limit, expand=LIST_EXPAND))
    while True:
        try:
            info = next(listing)
        except StopIteration:
            return
        except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
            raise SourceError(f"{uri}: listing the hub failed: {_reason(exc)}") from None
        yield _listed(api, info, unchanged, policy)


def model_at(uri: str, *, settings: Settings | None = None, policy: RetryPolicy = DEFAULT_POLICY) -> ModelRef:
    """One model, `hf://org/name` (its main branch) or `hf://org/name@rev`.

    Raises:
        SourceError: a malformed URI, or the model cannot be described (missing, gated, hub down).
        NoCheckpointError: the model has no checkpoint file.
    """
    repo_id, revision = _parse(uri)
    if not repo_id or "/" not in repo_id:
        raise SourceError(f"{uri}: expected hf://org/name or hf://org/name@revision")
    ref = _describe(_api(settings or Settings.from_env()), repo_id, revision, policy)
    if ref.error:
        raise SourceError(f"{uri}: {ref.error}")
    if not ref.files:
        raise NoCheckpointError(f"{uri}: no checkpoint in repository")
    return ref


def _parse(uri: str) -> tuple[str | None, str | None]:
    """`hf://org/name@rev` -> ("org/name", "rev"); `hf://` -> (None, None)."""
    if not uri.startswith("hf://"):
        raise SourceError(f"{uri}: not an hf:// URI")
    rest = uri.removeprefix("hf://").strip("/")
    if not rest:
        return None, None
    repo_id, _, revision = rest.partition("@")
    parts = repo_id.split("/")
    if len(parts) > 2 or any(not p or p in (".", "..") for p in parts) or (revision == "" and "@" in rest):
        raise SourceError(f"{uri}: expected hf://, hf://org, hf://org/name or hf://org/name@revision")
    if revision and len(parts) != 2:
        raise SourceError(f"{uri}: expected hf://org/name@revision (a revision needs a model)")
    return repo_id, revision or None


@functools.cache
def _use_timeouts() -> None:
    """Give huggingface_hub's shared client timeouts (its default has none: a stalled page hangs a crawl),
    keep the token for the hub's own origins, and give up on a hub that asks to wait too long."""

    def factory() -> httpx2.Client:
        client = hf_http.default_client_factory()  # its own hooks, redirects followed
        return httpx2.Client(
            event_hooks={"request": [*client.event_hooks["request"], _token_for_the_hub_only],
                         "response": [*client.event_hooks["response"], _refuse_long_waits]},
            follow_redirects=client.follow_redirects,
            timeout=httpx2.Timeout(LISTING_TIMEOUT_S, connect=10.0),
            transport=_BoundedTransport(),
        )

    hf_http.set_client_factory(factory)


class _BoundedTransport(httpx2.HTTPTransport):
    """Responses whose bodies end within API_DEADLINE_S of the request and API_MAX_BYTES."""

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = super().handle_request(request)
        response.stream = _BoundedStream(response.stream, request, time.monotonic() + API_DEADLINE_S)
        return response


class _BoundedStream(httpx2.SyncByteStream):
    def __init__(self, stream: httpx2.SyncByteStream, request: httpx2.Request, deadline: float) -> None:
        self._stream, self._request, self._deadline = stream, request, deadline

    def __iter__(self) -> Iterator[bytes]:
        got = 0
        for chunk in self._stream:
            got += len(chunk)
            if got > API_MAX_BYTES:
                raise HubRefused(f"a hub API response over {API_MAX_BYTES} bytes", request=self._request)
            if time.monotonic() > self._deadline:  # a timeout: huggingface_hub retries it, a few times
                raise httpx2.ReadTimeout(f"a hub API response still unfinished after {API_DEADLINE_S:.0f} s",
                                         request=self._request)
            yield chunk

    def close(self) -> None:
        self._stream.close()


def _token_for_the_hub_only(request: httpx2.Request) -> None:
    """huggingface_hub sends its token with every request it makes, to the next page a listing's `Link`
    header names too, whatever its host: the token goes to the hub's own origins only."""
    if "authorization" in request.headers and not is_hub_url(str(request.url)):
        del request.headers["authorization"]


def _refuse_long_waits(response: httpx2.Response) -> None:
    """huggingface_hub sleeps as long as a 429 or 503 asks (`Retry-After`, a `RateLimit` reset), with no cap:
    a hub asking for days would stall the crawl. Over DEFAULT_POLICY.max_retry_after, give up instead,
    as our own retries do (the listing fails with a SourceError, a model_info becomes an error row)."""
    if response.status_code not in RETRY_STATUSES:
        return
    wait = parse_retry_after(response.headers)
    limit = parse_ratelimit_headers(response.headers) if response.status_code == 429 else None
    if limit is not None and limit.remaining == 0:
        wait = max(wait or 0.0, float(limit.reset_in_seconds))
    if wait is not None and wait > DEFAULT_POLICY.max_retry_after:
        raise HubRefused(f"HTTP {response.status_code}: the hub asks to wait {wait:.0f} s, over "
                         f"{DEFAULT_POLICY.max_retry_after:.0f} s", request=response.request)


class HubRefused(httpx2.HTTPError):
    """A hub response given up on without a retry: it asks to wait longer than we retry for, or it is
    larger than we read."""

    def __init__(self, message: str, *, request: httpx2.Request) -> None:
        super().__init__(message)
        self.request = request


def _api(settings: Settings) -> HfApi:
    _use_timeouts()
    # token=False: never fall back to a token saved on disk (see the module docstring).
    return HfApi(endpoint=settings.hf_endpoint or DEFAULT_ENDPOINT, token=settings.hf_token or False,
                 library_name="modelhash")


def _listed(
    api: HfApi, info: ModelInfo, unchanged: Callable[[str, str], bool] | None, policy: RetryPolicy
) -> ModelRef:
    """A listed model, described with one model_info call when it has checkpoint files."""
    if not info.sha:
        return ModelRef(SOURCE, info.id, "", (), error="the listing gave no revision (sha)")
    if unchanged is not None and unchanged(info.id, info.sha):
        return ModelRef(SOURCE, info.id, info.sha, ())
    names = [s.rfilename for s in info.siblings or []]
    if info.siblings is not None and not any(is_checkpoint_name(n) for n in names):
        return ModelRef(SOURCE, info.id, info.sha, ())  # nothing to read: no model_info call
    return _describe(api, info.id, info.sha, policy)


def _describe(api: HfApi, repo_id: str, revision: str | None, policy: RetryPolicy) -> ModelRef:
    """The model at `revision` (main when None) as a ModelRef; failures become `error`."""
    try:
        info = call(
            lambda: api.model_info(repo_id, revision=revision, files_metadata=True, timeout=INFO_TIMEOUT_S),
            policy=policy,
            classify=_transient,
            host=api.endpoint,
            what=f"model_info {repo_id}",
        )
    except Transient as exc:
        reason = f"hub API: {exc.reason} (gave up after {exc.attempts} attempts)"
        return ModelRef(SOURCE, repo_id, revision or "", (), error=reason)
    except (HfHubHTTPError, HFValidationError, httpx2.HTTPError, OSError) as exc:
        return ModelRef(SOURCE, repo_id, revision or "", (), error=_reason(exc, revision))
    if not isinstance(info.id, str) or info.id.lower() != repo_id.lower():  # a row under another model's name
        return ModelRef(SOURCE, repo_id, revision or "", (), error=f"the hub described {info.id!r} when asked "
                        f"for {repo_id!r}")
    try:
        return _model_ref(info, api.endpoint)
    except (HFValidationError, ValueError, TypeError, AttributeError) as exc:  # a malformed description
        return ModelRef(SOURCE, repo_id, revision or "", (), error=f"hub API: malformed model info: {exc}")


def _model_ref(info: ModelInfo, endpoint: str) -> ModelRef:
    revision = info.sha or ""
    files = tuple(
        FileRef(
            name=s.rfilename,
            size=s.size if s.size is not None else -1,
            uri=hf_hub_url(info.id, s.rfilename, revision=revision, endpoint=endpoint),
            sha256=s.lfs.sha256 if s.lfs else None,
            # What the resolver's HEAD reports: X-Linked-Etag (the sha256) for LFS files, else the git oid.
            etag=s.lfs.sha256 if s.lfs else s.blob_id,
        )
        for s in info.siblings or []
        if is_checkpoint_name(s.rfilename) and stays_inside(s.rfilename)
    )
    card = info.card_data
    license_ = getattr(card, "license", None) if card is not None else None
    if not license_:
        license_ = next((t.removeprefix("license:") for t in info.tags or [] if t.startswith("license:")), None)
    bases = getattr(card, "base_model", None) if card is not None else None
    declared = (bases,) if isinstance(bases, str) else tuple(b for b in bases or () if isinstance(b, str))
    model_type = (info.config or {}).get("model_type")
    return ModelRef(
        source=SOURCE,
        model_id=info.id,
        revision=revision,
        files=files,
        arch=model_type if isinstance(model_type, str) else None,
        license=license_ if isinstance(license_, str) else None,
        declared_base=declared,
    )


def _transient(exc: BaseException) -> Transient | None:
    """A hub failure worth retrying (429, 5xx, reset, timeout), or None."""
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in RETRY_STATUSES:
            return Transient(f"HTTP {status}", retry_after=parse_retry_after(exc.response.headers))
        return None
    if isinstance(exc, _TRANSPORT_ERRORS):
        return Transient(type(exc).__name__)
    return None


def _reason(exc: BaseException, revision: str | None = None) -> str:
    """Why a hub call failed, in words (never the client's full message: it embeds request details)."""
    if isinstance(exc, HubRefused):
        return f"hub API: {exc}"
    if isinstance(exc, GatedRepoError):
        return "gated repository: accept its terms on the hub and set HF_TOKEN"
    if isinstance(exc, RepositoryNotFoundError):
        return "repository not found (deleted, renamed, or private: set HF_TOKEN)"
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {revision} not found (changed since listing?)"
    if isinstance(exc, HFValidationError):
        return f"invalid repository id or revision: {exc}"
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return f"hub API: HTTP {exc.response.status_code}"
    return f"hub API: {type(exc).__name__}"
