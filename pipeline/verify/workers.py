"""Independent torch jobs across CPU cores, one torch thread each.

A probe's models are small, and its work is made of independent jobs: four surrogates to train (batches
of 64, where a second intra-op thread helps little), eight models' input gradients per search step.
`Workers` runs such jobs side by side, as many as torch has threads, each on one torch thread. On this
project's 2-core machine, the verify zoo's CNN (A/B, two runs each, 2 torch threads): the four students
5.4-5.5 s against 6.6-8.4 s on two intra-op threads, the search 8.2-8.3 s against 9.0-9.6 s; on one thread
the jobs run in the caller's thread and the probe is the same, bit for bit, as before `Workers`. Where
torch has one thread (the benchmarks) or the models run on a GPU, the jobs run one after another.

Each job must own what it touches (its module, its optimizer, its tensors) and draw no random numbers from
the global generator: jobs interleave, so results stay the same only when each job is deterministic on its
own (a side-by-side probe equals the one-thread probe: tests/test_verify.py). While jobs run side by side,
torch's thread count is 1 for the whole process (torch has no per-thread setting); it is restored when the
pool closes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["Workers"]

T = TypeVar("T")
R = TypeVar("R")


class Workers:
    """A context manager: `map(fn, items)` runs `fn` on every item, side by side where it pays.

    `jobs`: the most jobs that will run at once (the pool is never larger); `device`: where the models run
    (only CPU jobs are spread over threads).
    """

    def __init__(self, jobs: int, device: torch.device | str = "cpu") -> None:
        cpu = torch.device(device).type == "cpu"
        self.size = min(jobs, torch.get_num_threads()) if cpu else 1
        self._pool: ThreadPoolExecutor | None = None
        self._threads = 0

    def __enter__(self) -> Workers:
        if self.size > 1:
            self._threads = torch.get_num_threads()
            torch.set_num_threads(1)
            self._pool = ThreadPoolExecutor(self.size, thread_name_prefix="modelhash-probe")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
            torch.set_num_threads(self._threads)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`fn` of every item, in the items' order; the first job's exception is raised."""
        if self._pool is None:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))
