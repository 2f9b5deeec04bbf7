"""What callers of one black box share across processes: its rate limit, and Tune's budget of calls."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Callable, Optional

import ray

from gdfo_ray.config import PoolConfig
from gdfo_ray.ratelimit import Pacer


def make_limiter(pool: PoolConfig):
    """The rate limiter actor every teacher of a pool shares (owned by the caller: it lives while held).

    To share one limit among several pools (runs or trials querying the same
    service), create it once in the process that outlives them and pass it to
    :func:`make_ray_teacher_pool`.
    """
    return ray.remote(LimiterActor).options(num_cpus=0, max_concurrency=10_000).remote(
        pool.calls_per_s, pool.max_in_flight, pool.rate_burst)


class LimiterActor:
    """The body of the Ray actor that one black box's callers share (see :func:`make_limiter`).

    Async, so thousands of waiting ``acquire`` calls cost no threads; it hands out
    slots in arrival order and start times from one :class:`Pacer`.
    """

    def __init__(self, calls_per_s: Optional[float], max_in_flight: Optional[int], burst: int = 1):
        self._pacer = Pacer(calls_per_s, burst)
        self._max_in_flight = max_in_flight
        self._slots = None
        self.settings = {"calls_per_s": calls_per_s, "max_in_flight": max_in_flight, "burst": burst}
        self.acquired = 0
        self.in_flight = 0
        self.peak_in_flight = 0

    async def acquire(self) -> float:
        """Wait for a slot in flight; returns the delay the caller must sleep before starting."""
        if self._max_in_flight:
            if self._slots is None:  # created on the actor's event loop
                import asyncio

                self._slots = asyncio.Semaphore(self._max_in_flight)
            await self._slots.acquire()
        self.acquired += 1
        if self._max_in_flight:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        return self._pacer.reserve(time.monotonic())

    async def release(self) -> None:
        if self._max_in_flight:
            self.in_flight -= 1
            self._slots.release()

    async def stats(self) -> dict:
        return {**self.settings, "acquired": self.acquired, "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight}


class SharedLimiter:
    """A teacher's view of a :class:`LimiterActor`: the blocking ``acquire``/``release`` of :class:`LocalLimiter`."""

    def __init__(self, handle, counts_in_flight: bool = True):
        self.handle = handle
        self.counts_in_flight = counts_in_flight  # without an in-flight cap, release needs no message

    def acquire(self) -> None:
        delay = ray.get(self.handle.acquire.remote())
        if delay > 0:
            time.sleep(delay)

    def release(self) -> None:
        if self.counts_in_flight:
            self.handle.release.remote()


def make_shared_budget(total: Optional[int], path: str):
    """The actor of a :class:`SharedBudget` (owned by the caller: it lives while held)."""
    return ray.remote(SharedBudget).options(num_cpus=0, max_concurrency=64).remote(total, path)


def budget_reservation(handle) -> Callable[[int], bool]:
    """A driver's ``reserve_calls``: reserves a generation's calls from the :class:`SharedBudget` actor ``handle``."""
    return lambda calls: ray.get(handle.reserve.remote(calls))


class SharedBudget:
    """Train calls all trials may spend together; its count survives a restart in ``path``."""

    def __init__(self, total: Optional[int], path: str):
        self.total, self.path = total, path
        self.spent = 0
        if os.path.exists(path):
            with open(path) as f:
                self.spent = int(json.load(f)["spent"])
        self._lock = threading.Lock()

    def reserve(self, calls: int) -> bool:
        with self._lock:
            if self.total is not None and self.spent + calls > self.total:
                return False
            self.spent += calls
            with open(self.path + ".tmp", "w") as f:
                json.dump({"spent": self.spent, "total": self.total}, f)
            os.replace(self.path + ".tmp", self.path)
            return True

    def state(self) -> dict:
        return {"spent": self.spent, "total": self.total}
