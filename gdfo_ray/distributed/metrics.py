"""A run's and a campaign's progress as Ray metrics: what the Ray dashboard and a Prometheus scraping the cluster show.

Ray exports every metric recorded in a process through its node's metrics endpoint
(``ray start --metrics-export-port``), with the prefix ``ray_``: ``ray_gdfo_calls_spent``,
and a counter as ``..._total``. Each series is tagged with the run (its output folder's name),
the task and the method, so that the runs of a campaign or a sweep on one cluster stay apart.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from ray.util.metrics import Counter, Gauge

RUN_TAGS = ("run", "task", "method")

# Gauge name -> (what it holds, the history row's key; None: derived from the row and the budget in RunMetrics).
RUN_GAUGES = {
    "gdfo_calls_spent": ("Black-box calls on the train batch spent so far.", "calls"),
    "gdfo_calls_left": ("Black-box calls left in the run's budget.", None),
    "gdfo_calls_per_s": ("Black-box calls per second in the last generation.", None),
    "gdfo_best_fitness": ("Best train loss (fitness) so far; lower is better.", "fitness_best"),
    "gdfo_dev_score": ("Last dev score of the best prompt so far.", "dev_score"),
    "gdfo_rho": ("rho of the last harmonized update (gdfo).", "rho"),
    "gdfo_fidelity": ("Spearman correlation of the student's ranking with the teacher's, last generation.",
                      "fidelity"),
    "gdfo_teacher_s": ("Seconds the last generation spent waiting on the teacher.", "teacher_s"),
    "gdfo_student_s": ("Seconds the last generation spent on the student.", "student_s"),
    "gdfo_generation": ("Generations completed.", "generation"),
}


class RunMetrics:
    """A driver hook: after every generation, the run's progress as gauges and a counter of calls.

    Gauges hold absolute values, so a resumed run (a new process) reports where it stands at
    once; the counter counts the calls this process spent, for ``rate()`` in Prometheus.
    """

    def __init__(self, run: str, task: str, method: str, budget: int):
        tags = {"run": run, "task": task, "method": method}
        self.budget = budget
        self.gauges = {name: Gauge(name, description=text, tag_keys=RUN_TAGS).set_default_tags(tags)
                       for name, (text, _) in RUN_GAUGES.items()}
        self.calls = Counter("gdfo_calls", description="Black-box calls on the train batch spent by this process.",
                             tag_keys=RUN_TAGS).set_default_tags(tags)
        self._last_calls: Optional[int] = None  # the calls spent at the last generation this process saw

    def __call__(self, driver: Any, row: dict) -> None:
        calls = int(row["calls"])
        if self._last_calls is None:  # where this process took the run up: 0, or a resumed run's last generation
            history = driver.state.history
            self._last_calls = int(history[-2]["calls"]) if len(history) >= 2 else 0
        new = calls - self._last_calls
        self._last_calls = calls
        values = {name: row.get(key) for name, (_, key) in RUN_GAUGES.items() if key is not None}
        values["gdfo_calls_left"] = self.budget - calls
        if row.get("step_s"):
            values["gdfo_calls_per_s"] = new / row["step_s"]
        for name, value in values.items():
            if value is not None and value == value:  # a NaN (no student this generation) is not reported
                self.gauges[name].set(float(value))
        if new:
            self.calls.inc(new)


def run_metrics(config: Any) -> RunMetrics:
    out = config.output_dir or config.default_output_dir()
    return RunMetrics(os.path.basename(os.path.normpath(out)), config.task.name, config.label,
                      config.search.budget_calls)


class CampaignMetrics:
    """Cells done, failed and left of a campaign (tagged by its results folder's name)."""

    def __init__(self, campaign: str, done: int, left: int):
        tags = {"campaign": campaign}
        self.gauges = {name: Gauge(f"gdfo_campaign_cells_{name}", description=f"Cells of the campaign {text}.",
                                   tag_keys=("campaign",)).set_default_tags(tags)
                       for name, text in (("done", "finished, this invocation or before"),
                                          ("failed", "that raised"), ("left", "still to run"))}
        self.counts = {"done": done, "failed": 0, "left": left}
        self._publish()

    def finished(self, failed: bool = False) -> None:
        self.counts["failed" if failed else "done"] += 1
        self.counts["left"] -= 1
        self._publish()

    def _publish(self) -> None:
        for name, value in self.counts.items():
            self.gauges[name].set(float(value))
