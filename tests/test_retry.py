"""Request caps from the environment: what a crawl's --max-rps sets for itself and its Ray workers."""

from __future__ import annotations

import time

import pytest

from pipeline.retry import CONNECTIONS_ENV, RATE_ENV, HostLimits, default_limits, host_slot, set_host_limits


def test_caps_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RATE_ENV, raising=False)
    monkeypatch.delenv(CONNECTIONS_ENV, raising=False)
    assert default_limits() == HostLimits()
    monkeypatch.setenv(RATE_ENV, "20")
    monkeypatch.setenv(CONNECTIONS_ENV, "2")
    assert default_limits() == HostLimits(rate=20.0, connections=2)


def test_a_rate_spaces_request_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RATE_ENV, "50")
    host = "paced.example:1"
    set_host_limits(host, None)  # forget any cached host state: the env applies to new hosts
    start = time.monotonic()
    for _ in range(6):
        with host_slot(host):
            pass
    assert time.monotonic() - start >= 5 / 50 * 0.95  # 6 starts at 50/s span at least 100 ms
    set_host_limits(host, None)
