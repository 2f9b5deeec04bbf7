"""Rate limits on black-box calls: calls per second (with a burst) and calls in flight.

:class:`Pacer` is the pure rule (GCRA, the token bucket as scheduled start times),
with the clock passed in, so it is testable without sleeping. The service uses
it to refuse (``try_acquire``); callers use :class:`LocalLimiter`, which waits,
or its Ray twin in :mod:`gdfo_ray.distributed`, shared by every actor of a pool.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional


class Pacer:
    """At most ``burst + rate * t`` calls start in any window of length ``t``.

    >>> p = Pacer(rate=2.0, burst=1)
    >>> [p.reserve(now=0.0) for _ in range(3)]
    [0.0, 0.5, 1.0]
    >>> p.try_acquire(now=0.2)  # refused: the next slot is 1.5 s away
    1.3
    """

    def __init__(self, rate: Optional[float], burst: int = 1):
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be positive calls per second or None (no limit), but got {rate}.")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, but got {burst}.")
        self.rate, self.burst = rate, burst
        self._tat = float("-inf")  # theoretical arrival time of the next call

    def _start(self, now: float, weight: float = 1.0) -> tuple[float, float]:
        interval = 1.0 / self.rate
        tat = max(self._tat, now)
        return max(now, tat - (self.burst - weight) * interval), tat + weight * interval

    def reserve(self, now: float) -> float:
        """Book the next slot; returns how long to wait before starting the call."""
        if self.rate is None:
            return 0.0
        start, self._tat = self._start(now)
        return round(start - now, 9)

    def try_acquire(self, now: float, weight: float = 1.0) -> float:
        """Book ``weight`` slots only if they are free now: 0.0, else the seconds until they are (nothing booked).

        A weight above ``burst`` can never be booked (see :func:`pacer_fits`).

        >>> p = Pacer(rate=10.0, burst=20)
        >>> p.try_acquire(0.0, weight=15), p.try_acquire(0.0, weight=10), p.try_acquire(0.5, weight=10)
        (0.0, 0.5, 0.0)
        """
        if self.rate is None:
            return 0.0
        start, tat = self._start(now, weight)
        if start > now:
            return round(start - now, 9)
        self._tat = tat
        return 0.0


def pacer_fits(pacer: Pacer, weight: float) -> bool:
    """Whether a call of ``weight`` can ever pass ``pacer`` (its burst holds it)."""
    return pacer.rate is None or weight <= pacer.burst


class LocalLimiter:
    """A thread-safe limiter for one process: ``acquire()`` blocks until the call may start."""

    def __init__(self, calls_per_s: Optional[float], max_in_flight: Optional[int], burst: int = 1,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self._pacer = Pacer(calls_per_s, burst)
        self._slots = threading.BoundedSemaphore(max_in_flight) if max_in_flight else None
        self._lock = threading.Lock()
        self._clock, self._sleep = clock, sleep

    def acquire(self) -> None:
        if self._slots is not None:
            self._slots.acquire()
        with self._lock:
            delay = self._pacer.reserve(self._clock())
        if delay > 0:
            self._sleep(delay)

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
