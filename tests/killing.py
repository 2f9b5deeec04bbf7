"""Killing a run the way a crash does: SIGKILL when a given generation's progress line appears."""

from __future__ import annotations

import signal
import subprocess


def kill_at_generation(argv: list, generation: int, **popen) -> None:
    """Run ``argv`` (a ``gdfo run``) and SIGKILL it as soon as it prints generation ``generation``'s line."""
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, **popen)
    prefix = f"gen {generation:3d} "
    for line in proc.stderr:
        if line.startswith(prefix):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended ({proc.returncode}) before generation {generation}"
