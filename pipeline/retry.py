"""Retries with backoff, and per-host pacing, for the HTTP calls we make ourselves (hub model info, range
reads), so that a nightly crawl rides out 429s, 5xx, resets and timeouts without hammering the host.

`call(attempt, ...)` runs an attempt until it succeeds, fails for good, or runs out of attempts. An attempt
signals "worth retrying" by raising `Transient` (or `classify` maps a foreign exception to one).
`host_slot(url)` bounds the connections to a host and spaces request starts to its rate; a `Retry-After`
pauses the whole host, so that threads sharing it back off together. Caps hold per process: each Ray
worker paces itself (a cluster-wide budget would need an actor).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from pipeline.settings import redact

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_POLICY",
    "RETRY_STATUSES",
    "HostLimits",
    "RetryPolicy",
    "Transient",
    "call",
    "host_slot",
    "parse_retry_after",
    "pause_host",
    "set_host_limits",
]

T = TypeVar("T")
log = logging.getLogger(__name__)

# 408 timeout, 425 too early, 429 rate limited, and the server-side failures a retry may cure.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to retry.

    Attributes:
        attempts: tries in all, the first included.
        base_delay: seconds before the first retry; doubled for each further one, up to `max_delay`.
        max_delay: the longest backoff between two tries.
        max_retry_after: a server asking to wait longer than this is answered by giving up.
        jitter: the fraction of each backoff drawn at random, so that workers do not retry in step.
    """

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 300.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0 or not 0 <= self.jitter <= 1:
            raise ValueError("delays must be non-negative and jitter within [0, 1]")

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `retry` (1 for the first); a server's Retry-After wins."""
        if retry_after is not None:
            return max(0.0, retry_after)
        backoff = min(self.max_delay, self.base_delay * 2 ** (retry - 1))
        return backoff * (1.0 - self.jitter * random.random())


DEFAULT_POLICY = RetryPolicy()


class Transient(Exception):
    """An attempt failed in a way a later attempt may not (429, 5xx, reset, timeout).

    After the last attempt `call` raises it with `attempts` set: callers turn it into their own error.
    """

    def __init__(self, reason: str, retry_after: float | None = None, host: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.host = host  # the URL or host that asked to wait, when it differs from `call`'s
        self.attempts = 0


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a `Retry-After: <seconds>` header (HTTP dates are ignored: backoff applies)."""
    value = headers.get("Retry-After") or headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def call(
    attempt: Callable[[], T],
    *,
    policy: RetryPolicy = DEFAULT_POLICY,
    classify: Callable[[BaseException], Transient | None] | None = None,
    host: str | None = None,
    what: str = "request",
    on_retry: Callable[[Transient, float], None] | None = None,
) -> T:
    """`attempt()`, retried on `Transient` under `policy`.

    Args:
        attempt: one try; raises `Transient` when worth retrying, anything else to fail at once.
        policy: attempts and backoff.
        classify: maps another exception to a `Transient` (retried) or None (raised as is).
        host: a URL or host whose connection slot each attempt holds, and which a Retry-After pauses
            (attempts that talk to several hosts take `host_slot` themselves and name the host that
            asked to wait in `Transient.host`).
        what: words for the log line of each retry (no secrets: it is logged).
        on_retry: called with the failure and the delay before each retry (counters, tests).

    Raises:
        Transient: the last failure, after `policy.attempts` tries or when the server asks to wait
            longer than `policy.max_retry_after`; its `attempts` says how many tries were made.
        Exception: whatever `attempt` raised that is not transient.
    """
    for n in range(1, policy.attempts + 1):
        try:
            if host is None:
                return attempt()
            with host_slot(host):
                return attempt()
        except Transient as exc:
            failure = exc
        except Exception as exc:
            mapped = classify(exc) if classify else None
            if mapped is None:
                raise
            failure = mapped
        failure.attempts = n
        too_long = failure.retry_after is not None and failure.retry_after > policy.max_retry_after
        if n == policy.attempts or too_long:
            raise failure
        paused = failure.host or host
        if failure.retry_after and paused is not None:
            pause_host(paused, failure.retry_after)
        wait = policy.delay(n, failure.retry_after)
        log.info("%s: %s; retry %d/%d in %.2f s", what, redact(failure.reason), n, policy.attempts - 1, wait)
        if on_retry is not None:
            on_retry(failure, wait)
        time.sleep(wait)
    raise AssertionError("unreachable")  # the loop returns or raises


@dataclass(frozen=True, slots=True)
class HostLimits:
    """Caps on the requests this process sends to one host.

    Attributes:
        rate: request starts per second (None: unpaced). The hub allows about 1.7 API and 10 resolver
            calls per second per IP (anonymous, ecosystem.md 1.5); its CDN far more.
        connections: requests in flight at once.
    """

    rate: float | None = None
    connections: int = 8

    def __post_init__(self) -> None:
        if self.connections < 1 or (self.rate is not None and self.rate <= 0):
            raise ValueError("connections must be at least 1 and rate positive")


DEFAULT_LIMITS = HostLimits()
RATE_ENV, CONNECTIONS_ENV = "MODELHASH_MAX_RPS", "MODELHASH_MAX_CONNECTIONS"


def default_limits() -> HostLimits:
    """The caps of a host with none set: `MODELHASH_MAX_RPS` and `MODELHASH_MAX_CONNECTIONS` when set (so a
    crawl's `--max-rps` reaches every Ray worker through its environment), else DEFAULT_LIMITS."""
    rate = os.environ.get(RATE_ENV)
    connections = os.environ.get(CONNECTIONS_ENV)
    return HostLimits(
        rate=float(rate) if rate else DEFAULT_LIMITS.rate,
        connections=int(connections) if connections else DEFAULT_LIMITS.connections,
    )


class _Host:
    def __init__(self, limits: HostLimits):
        self.limits = limits
        self.slots = threading.BoundedSemaphore(limits.connections)
        self.lock = threading.Lock()
        self.next_start = 0.0  # monotonic time before which no request may start
        self.paused_until = 0.0

    @contextmanager
    def slot(self) -> Iterator[None]:
        self.slots.acquire()
        try:
            with self.lock:
                now = time.monotonic()
                start = max(now, self.next_start, self.paused_until)
                if self.limits.rate:
                    self.next_start = start + 1.0 / self.limits.rate
            if start > now:
                time.sleep(start - now)
            yield
        finally:
            self.slots.release()

    def pause(self, seconds: float) -> None:
        with self.lock:
            self.paused_until = max(self.paused_until, time.monotonic() + seconds)


_REGISTRY_LOCK = threading.Lock()
_LIMITS: dict[str, HostLimits] = {}
_HOSTS: dict[str, _Host] = {}


def _key(url_or_host: str) -> str:
    """`host[:port]`, lower-cased, of a URL or of a bare host."""
    netloc = urlsplit(url_or_host).netloc if "://" in url_or_host else url_or_host
    return netloc.rsplit("@", 1)[-1].lower()


def _host(url_or_host: str) -> _Host:
    key = _key(url_or_host)
    with _REGISTRY_LOCK:
        found = _HOSTS.get(key)
        if found is None:
            found = _HOSTS[key] = _Host(_LIMITS.get(key) or default_limits())
        return found


def set_host_limits(url_or_host: str, limits: HostLimits | None) -> None:
    """Caps for one host (`huggingface.co`, `127.0.0.1:8080` or any URL on it); None restores the default.
    Requests already waiting keep the caps they started under."""
    key = _key(url_or_host)
    with _REGISTRY_LOCK:
        if limits is None:
            _LIMITS.pop(key, None)
        else:
            _LIMITS[key] = limits
        _HOSTS.pop(key, None)


@contextmanager
def host_slot(url_or_host: str) -> Iterator[None]:
    """Hold one of the host's connection slots, starting no sooner than its rate and any pause allow."""
    with _host(url_or_host).slot():
        yield


def pause_host(url_or_host: str, seconds: float) -> None:
    """No new request to the host for `seconds` (a 429's Retry-After applies to every thread)."""
    _host(url_or_host).pause(seconds)


def _forget_hosts() -> None:
    # Semaphores held by threads of the parent mean nothing in a forked child.
    _HOSTS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_hosts)
