"""S3 objects as RangeReaders: ranged GETs with boto3, and botocore's errors translated once, here.

Configuration is read at call time from the environment, as boto3 does: `AWS_ENDPOINT_URL` (or
`AWS_ENDPOINT_URL_S3`) for an S3-compatible server, `AWS_REGION`/`AWS_DEFAULT_REGION`, and the standard
credential chain (env keys, `AWS_PROFILE`, config files, instance or pod roles). Clients are built lazily
and cached per process and thread; readers carry no client and no credentials, so they pickle to Ray workers.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

import boto3
import botocore.exceptions as bexc
from botocore.config import Config

from pipeline.blobs import _check_range
from pipeline.errors import BlobError, ModelhashError

S3Client = Any  # botocore builds the class at run time; there is nothing static to name

__all__ = ["S3Reader", "client", "parse_uri", "put_if_absent", "translate"]

MAX_ATTEMPTS = 5  # botocore "standard" retries: throttling, 5xx, connection errors, with backoff
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
BODY_ATTEMPTS = 3  # a response body cut mid-stream is not retried by botocore: we re-issue the GET
MAX_POOL_CONNECTIONS = 16

# Every variable that changes which client boto3 would build: a new value, a new client.
_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})
_DENIED = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AccountProblem",
    }
)
_CHANGED = frozenset({"PreconditionFailed", "412", "InvalidRange", "416"})
_UNREACHABLE = (bexc.EndpointConnectionError, bexc.ConnectTimeoutError, bexc.ConnectionClosedError)
_BODY_ERRORS = (bexc.ResponseStreamingError, bexc.IncompleteReadError, bexc.ReadTimeoutError, ConnectionError)

_local = threading.local()


def parse_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key/parts` -> ("bucket", "key/parts"); the key may be empty.

    Raises:
        BlobError: not an `s3://` URI, or no bucket.
    """
    scheme, sep, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    if not sep or scheme != "s3" or not bucket:
        raise BlobError(f"{uri}: not an S3 URI (expected s3://bucket/key)")
    return bucket, key


def endpoint_url() -> str | None:
    """The S3 endpoint the environment names (`AWS_ENDPOINT_URL_S3`, then `AWS_ENDPOINT_URL`), if any."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str | None:
    """The region the environment names (`AWS_REGION`, then `AWS_DEFAULT_REGION`), if any."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def client(
    *,
    endpoint: str | None = None,
    region_name: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    session_token: str | None = None,
) -> S3Client:
    """A boto3 S3 client for this process and thread, built on first use.

    Arguments left None come from the environment and the credential chain, read now (not at import).
    """
    endpoint = endpoint or endpoint_url()
    region_name = region_name or region()
    key = (os.getpid(), endpoint, region_name, access_key, secret_key, session_token) + tuple(
        os.environ.get(k) for k in _ENV_KEYS
    )
    cache: dict[tuple, S3Client] | None = getattr(_local, "clients", None)
    if cache is None:
        cache = _local.clients = {}
    found = cache.get(key)
    if found is None:
        config = Config(
            retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            max_pool_connections=MAX_POOL_CONNECTIONS,
            # S3-compatible servers (MinIO, Ceph, moto) want path-style; AWS itself picks virtual hosts.
            s3={"addressing_style": "path"} if endpoint else None,
        )
        # A session per client: boto3's default session is not safe to build from several threads.
        found = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=region_name,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            aws_session_token=session_token,
            config=config,
        )
        cache[key] = found
    return found


def translate(exc: Exception, uri: str, *, error: type[ModelhashError] = BlobError) -> ModelhashError:
    """One botocore exception as one of our errors (BlobError unless `error` says otherwise), with a reason.

    Not found, access denied, changed (a failed precondition or range), unreachable endpoint, missing
    credentials each get a message of their own; anything else keeps S3's code and message.
    """
    if isinstance(exc, bexc.ClientError):
        info = exc.response.get("Error", {})
        code = str(info.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
        message = info.get("Message") or ""
        if code == "NoSuchBucket":
            return error(f"{uri}: not found (no such bucket)")
        if code in _NOT_FOUND:
            return error(f"{uri}: not found")
        if code in _DENIED:
            return error(f"{uri}: access denied ({code}: {message or 'no reason given'})")
        if code in _CHANGED:
            return error(f"{uri}: changed since listing ({code}: {message or 'precondition failed'})")
        return error(f"{uri}: S3 error {code}: {message}".rstrip(": "))
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return error(f"{uri}: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    if isinstance(exc, _UNREACHABLE):
        return error(f"{uri}: cannot reach S3 at {endpoint_url() or 'AWS'}: {exc}")
    if isinstance(exc, bexc.ParamValidationError):
        return error(f"{uri}: invalid S3 request: {exc}")
    return error(f"{uri}: S3 request failed: {exc}")


def _quoted(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


class S3Reader:
    """One S3 object, read with ranged GETs.

    Every GET carries `If-Match` on the object's ETag, so all ranges come from one version of the object.
    That ETag is the listing's (`expected_etag`, then no HEAD is needed when `expected_size` is given
    too), or the one a HEAD finds on first use.

    Args:
        uri: `s3://bucket/key`.
        expected_size: the size the listing reported.
        expected_etag: the ETag the listing reported (quoted or not).

    Raises:
        BlobError: (on first use, or from `read`) the object or bucket does not exist ("not found"),
            access is denied, it differs from the listing ("changed since listing"), S3 cannot be reached.
    """

    def __init__(self, uri: str, *, expected_size: int | None = None, expected_etag: str | None = None) -> None:
        self.uri = uri
        self.bucket, self.key = parse_uri(uri)
        if not self.key or self.key.endswith("/"):
            raise BlobError(f"{uri}: not an object (expected s3://bucket/key)")
        self.expected_size = expected_size
        self.expected_etag = _quoted(expected_etag) if expected_etag else None
        self._size = expected_size if expected_etag else None
        self._etag = self.expected_etag if expected_size is not None else None
        self._bytes_read = 0

    @property
    def size(self) -> int:
        return self._pinned()[0]

    @property
    def etag(self) -> str:
        """The ETag every read is pinned to."""
        return self._pinned()[1]

    @property
    def bytes_read(self) -> int:
        return self._bytes_read

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset`, in one ranged GET.

        Raises:
            BlobError: the range is outside the object, or see the class.
        """
        _check_range(offset, length, self.size, self.uri)
        if length == 0:
            return b""
        data = self._get(offset, length)
        self._bytes_read += length
        return data

    def _pinned(self) -> tuple[int, str]:
        size, etag = self._size, self._etag
        if size is None or etag is None:
            size, etag = self._stat()
            self._size, self._etag = size, etag
        return size, etag

    def _stat(self) -> tuple[int, str]:
        try:
            head = client().head_object(Bucket=self.bucket, Key=self.key)
        except (bexc.ClientError, bexc.BotoCoreError) as exc:
            raise translate(exc, self.uri) from exc
        size, etag = int(head["ContentLength"]), _quoted(head["ETag"])
        if self.expected_size is not None and size != self.expected_size:
            raise BlobError(f"{self.uri}: changed since listing (size {size}, listed {self.expected_size})")
        if self.expected_etag is not None and etag != self.expected_etag:
            raise BlobError(f"{self.uri}: changed since listing (ETag {etag}, listed {self.expected_etag})")
        return size, etag

    def _get(self, offset: int, length: int) -> bytes:
        size, etag = self._pinned()
        for attempt in range(1, BODY_ATTEMPTS + 1):
            try:
                response = client().get_object(
                    Bucket=self.bucket, Key=self.key, Range=f"bytes={offset}-{offset + length - 1}", IfMatch=etag
                )
                data = response["Body"].read()
            except _BODY_ERRORS as exc:
                if attempt == BODY_ATTEMPTS:
                    raise BlobError(f"{self.uri}: read of {length} bytes at {offset} failed: {exc}") from exc
                continue
            except (bexc.ClientError, bexc.BotoCoreError) as exc:
                raise translate(exc, self.uri) from exc
            total = str(response.get("ContentRange", "")).rpartition("/")[2]
            if total.isdigit() and int(total) != size:
                raise BlobError(f"{self.uri}: changed since listing (size {total}, listed {size})")
            if len(data) != length:
                raise BlobError(f"{self.uri}: short read: {len(data)} of {length} bytes at {offset}")
            return data
        raise AssertionError("unreachable")

    def __reduce__(self):
        # Pin the other side to the version this one saw (no client, no credentials travel).
        size = self._size if self._size is not None else self.expected_size
        etag = self._etag or self.expected_etag
        return (functools.partial(S3Reader, expected_size=size, expected_etag=etag), (self.uri,))

    def __repr__(self) -> str:
        return f"S3Reader({self.uri!r}, size={self._size}, etag={self._etag})"


def put_if_absent(uri: str, data: bytes, *, s3: S3Client | None = None) -> None:
    """Create the object at `uri` with one PUT, only if no object is there (`If-None-Match: *`).

    A single PUT is atomic: readers see nothing or all of it. Stores without conditional writes
    (HTTP 501) get a HEAD then a plain PUT, which is check-then-write, not atomic.

    Raises:
        FileExistsError: an object is already at `uri`.
        BlobError: any other failure, translated.
    """
    bucket, key = parse_uri(uri)
    s3 = s3 or client()
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return
    except bexc.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code"))
        if code in ("PreconditionFailed", "412"):
            raise FileExistsError(f"{uri}: already exists") from exc
        if code not in ("NotImplemented", "501"):
            raise translate(exc, uri) from exc
    except bexc.BotoCoreError as exc:
        raise translate(exc, uri) from exc
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except bexc.ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) not in _NOT_FOUND:
            raise translate(exc, uri) from exc
    except bexc.BotoCoreError as exc:
        raise translate(exc, uri) from exc
    else:
        raise FileExistsError(f"{uri}: already exists")
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    except (bexc.ClientError, bexc.BotoCoreError) as exc:
        raise translate(exc, uri) from exc
