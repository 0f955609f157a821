"""A real S3 on loopback (moto's server) for the session, and an AWS environment that points only at it.

The environment is set when this module is imported, at collection, before any test runs, and not in a
fixture: Ray workers inherit the environment of the raylet, which the session-scoped `ray_local` fixture
starts on first use, possibly before the first S3 test. Set later, AWS_* would never reach the workers
that read `s3://` checkpoints. The port is reserved then too; the server binds it when first needed.
Credentials are fake and config files are blanked, so no test can reach a real AWS account.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Fixtures are named with `name=` so that a test module can import them (`..._fixture`) without its
# parameters shadowing the imports.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PORT = _free_port()
ENDPOINT = f"http://127.0.0.1:{PORT}"
S3_ENV = {
    "AWS_ENDPOINT_URL": ENDPOINT,
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probes (they stall pyarrow's S3 setup)
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")

os.environ.update(S3_ENV)
for _name in _UNSET:
    os.environ.pop(_name, None)


@pytest.fixture(scope="session", name="s3_server")
def s3_server_fixture() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 for the session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=PORT, verbose=False)
    server.start()
    yield ENDPOINT
    server.stop()


@pytest.fixture(name="s3")
def s3_fixture(s3_server: str, monkeypatch: pytest.MonkeyPatch):
    """A boto3 client of the test server; the AWS environment is re-asserted for the test."""
    import boto3

    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    for name in _UNSET:
        monkeypatch.delenv(name, raising=False)
    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


@pytest.fixture(name="bucket")
def bucket_fixture(s3) -> Iterator[str]:
    """A fresh, empty bucket, deleted with its objects after the test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield name
    empty_bucket(s3, name)
    s3.delete_bucket(Bucket=name)


def empty_bucket(s3, name: str) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        if page.get("Contents"):
            keys = [{"Key": item["Key"]} for item in page["Contents"]]
            s3.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})


def upload_tree(s3, folder: Path, bucket: str, prefix: str, **put_args: object) -> list[str]:
    """Put every file under `folder` at `prefix/<relative path>`; returns the keys, sorted."""
    keys = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(folder).as_posix()}".lstrip("/")
        s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), **put_args)
        keys.append(key)
    return keys


@pytest.fixture(scope="session", name="s3_library")
def s3_library_fixture(s3_server: str, library: dict[str, Path]) -> dict[str, str]:
    """The checkpoint library (conftest's `library`) uploaded under `s3://<bucket>/lib`: the same names,
    mapped to `s3://` URIs; `root` is the prefix's URI. Read-only: tests that change objects use `bucket`."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    name = f"library-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=name)
    upload_tree(s3, library["root"], name, "lib")
    uris = {role: f"s3://{name}/lib/{path.relative_to(library['root']).as_posix()}" for role, path in library.items()}
    uris["root"] = f"s3://{name}/lib"
    return uris
