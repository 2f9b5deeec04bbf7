"""Functions run as Ray tasks, gathered as each finishes: how a campaign spreads its cells over a cluster."""

from __future__ import annotations

from typing import Any, Callable, Hashable, Iterator, Optional

import ray


def as_completed(fn: Callable, calls: dict[Hashable, tuple], *, num_cpus: float, num_gpus: float,
                 max_retries: int) -> Iterator[tuple[Hashable, Any, Optional[Exception]]]:
    """``fn(*args)`` for each ``key: args`` of ``calls`` as a Ray task; yields ``(key, result, error)`` as each ends.

    A task's own exception comes back as ``error`` (Ray's wrapper: its ``cause`` is the task's
    exception, its traceback the remote one) and the others go on; it is not retried
    (``max_retries`` counts lost workers only).
    """
    remote = ray.remote(fn).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
                                    retry_exceptions=False)
    pending = {remote.remote(*args): key for key, args in calls.items()}
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        key = pending.pop(ref)
        try:
            yield key, ray.get(ref), None
        except Exception as e:  # noqa: BLE001 - handed to the caller, which records it
            yield key, None, e
