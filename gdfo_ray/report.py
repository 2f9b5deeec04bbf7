"""``gdfo report``: a campaign's results as the BBT/BBTv2 papers show them, plus dev-score curves.

The table has one row per method and one column per task: the test score (accuracy,
F1 for MRPC) in percent, mean and standard deviation over seeds, and the average
over tasks, which is only given for a method that has every task. The plots show,
per task, the best dev score so far against train calls, one line per method
(mean over seeds, the band spans min to max).
"""

from __future__ import annotations

import calendar
import json
import os
import time
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np

from gdfo_ray.campaign import read_results
from gdfo_ray.exceptions import GDFOError

TASK_ORDER = ("sst2", "yelp_polarity", "ag_news", "dbpedia", "mrpc", "snli", "rte")
TASK_TITLES = {"sst2": "SST-2", "yelp_polarity": "Yelp P.", "ag_news": "AG News", "dbpedia": "DBPedia",
               "mrpc": "MRPC", "snli": "SNLI", "rte": "RTE"}
METHOD_ORDER = ("manual", "bbt", "bbtv2", "kd", "gdfo", "gdfo_random", "white_box")


def _ordered(values: Sequence[str], order: Sequence[str]) -> list:
    known = [v for v in order if v in values]
    return known + sorted(v for v in values if v not in order)


def _cell(scores: list) -> str:
    a = 100 * np.asarray(scores, dtype=float)
    return f"{a.mean():.2f} ± {a.std(ddof=1):.2f}" if len(a) > 1 else f"{a.mean():.2f}"


def score_table(rows: list[dict], value: str = "test_score") -> str:
    """Markdown: methods x tasks, mean ± std over seeds (in percent) and the average column."""
    tasks = _ordered({r["task"] for r in rows}, TASK_ORDER)
    methods = _ordered({r["method"] for r in rows}, METHOD_ORDER)
    by = defaultdict(list)
    for r in rows:
        if r.get(value) is not None:
            by[(r["method"], r["task"])].append(float(r[value]))
    seeds = {t: max((len(by[(m, t)]) for m in methods), default=0) for t in tasks}
    header = "| method | " + " | ".join(TASK_TITLES.get(t, t) for t in tasks) + " | Avg. |"
    lines = [header, "|" + "---|" * (len(tasks) + 2)]
    for m in methods:
        cells, means = [], []
        for t in tasks:
            scores = by[(m, t)]
            if not scores:
                cells.append("–")
                continue
            partial = "†" if len(scores) < seeds[t] else ""
            cells.append(_cell(scores) + partial)
            means.append(float(np.mean(scores)))
        avg = f"{100 * np.mean(means):.2f}" if len(means) == len(tasks) else "–"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)


def cost_table(rows: list[dict]) -> str:
    """Markdown: per method and task, mean train calls + dev calls and mean wall time of a cell."""
    tasks = _ordered({r["task"] for r in rows}, TASK_ORDER)
    methods = _ordered({r["method"] for r in rows}, METHOD_ORDER)
    by = defaultdict(list)
    for r in rows:
        by[(r["method"], r["task"])].append(r)
    lines = ["| method | " + " | ".join(TASK_TITLES.get(t, t) for t in tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for m in methods:
        cells = []
        for t in tasks:
            rs = by[(m, t)]
            if not rs:
                cells.append("–")
                continue
            calls = np.mean([r["calls"] for r in rs])
            dev = np.mean([r["dev_calls"] for r in rs])
            # A resumed cell's wall time covers only what ran after the resume: used only when nothing else is.
            whole = [r["wall_s"] for r in rs if not r.get("resumed")]
            time_s = f"{np.mean(whole):.0f} s" if whole else f"{np.mean([r['wall_s'] for r in rs]):.0f} s*"
            cells.append(f"{calls:.0f}+{dev:.0f} calls, {time_s}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def missing_cells(results_dir: str, rows: list[dict]) -> list[str]:
    """Cells some ``gdfo bench`` invocation asked for that have not finished (cut short, or failed)."""
    import yaml

    path = os.path.join(results_dir, "campaign.yaml")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        invocations = (yaml.safe_load(f) or {}).get("invocations", [])
    done = {(r["task"], r["method"], int(r["seed"])) for r in rows}
    asked = {(t, m, int(s)) for inv in invocations for t in inv["tasks"] for m in inv["methods"] for s in inv["seeds"]}
    return [f"{t}_{m}_seed{s}" for t, m, s in sorted(asked - done)]


def _best_so_far(curve: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((r["calls"], r["dev_score"]) for r in curve if r.get("dev_score") is not None)
    if not pts:
        return np.zeros(0), np.zeros(0)
    calls = np.asarray([p[0] for p in pts])
    return calls, np.maximum.accumulate(np.asarray([p[1] for p in pts]))


def plot_curves(rows: list[dict], curves: list[dict], out_dir: str) -> list[str]:
    """One PNG per task: best dev score so far against train calls, one line per method."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    by = defaultdict(list)
    for r in curves:
        by[(r["task"], r["method"], int(r["seed"]))].append(r)
    manual = defaultdict(list)
    for r in rows:
        if r["method"] == "manual" and r.get("dev_best") is not None:
            manual[r["task"]].append(float(r["dev_best"]))
    paths = []
    os.makedirs(out_dir, exist_ok=True)
    for task in _ordered({r["task"] for r in rows}, TASK_ORDER):
        fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
        for method in _ordered({m for t, m, _ in by if t == task}, METHOD_ORDER):
            runs = [_best_so_far(c) for (t, m, _), c in by.items() if t == task and m == method]
            runs = [r for r in runs if len(r[0])]
            if not runs:
                continue
            grid = np.unique(np.concatenate([c for c, _ in runs]))
            # Each seed's best-so-far as a step function on the common grid of call counts.
            ys = np.asarray([[y[np.searchsorted(c, g, side="right") - 1] if g >= c[0] else np.nan for g in grid]
                             for c, y in runs])
            line, = ax.plot(grid, 100 * np.nanmean(ys, axis=0), drawstyle="steps-post", marker="o", markersize=3,
                            label=method)
            ax.fill_between(grid, 100 * np.nanmin(ys, axis=0), 100 * np.nanmax(ys, axis=0), step="post",
                            alpha=0.15, color=line.get_color())
        if manual.get(task):
            ax.axhline(100 * np.mean(manual[task]), color="gray", linestyle="--", label="manual")
        metric = next((r["metric"] for r in rows if r["task"] == task), "score")
        ax.set(title=TASK_TITLES.get(task, task), xlabel="train API calls", ylabel=f"best dev {metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"dev_{task}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _setting(rows: list[dict]) -> str:
    configs = [json.loads(r["config_json"]) for r in rows]
    searched = [c for c in configs if c["method"] != "manual"] or configs
    versions = json.loads(rows[0]["versions_json"])

    def values(get) -> str:
        return ", ".join(sorted({str(get(c)) for c in searched}))

    seeds = sorted({int(r["seed"]) for r in rows})
    # Cells record when they finished and how long they ran; the oldest rows have no start time.
    start = min(calendar.timegm(time.strptime(r["finished_at"], "%Y-%m-%dT%H:%M:%SZ")) - r["wall_s"] for r in rows)
    end = max(calendar.timegm(time.strptime(r["finished_at"], "%Y-%m-%dT%H:%M:%SZ")) for r in rows)
    return "\n".join([
        f"- teacher (black box): {values(lambda c: c['model']['teacher'])} "
        f"({', '.join(sorted({str(r['teacher_dtype']) for r in rows}))}); "
        f"student: {values(lambda c: c['model']['student'])}",
        f"- budget: {values(lambda c: c['search']['budget_calls'])} train calls per run; "
        f"popsize {values(lambda c: c['search']['popsize'] or 'auto')}, d = "
        f"{values(lambda c: c['prompt']['intrinsic_dim'])}, n = {values(lambda c: c['prompt']['n_prompt_tokens'])} "
        f"prompt tokens, prompt placement {values(lambda c: c['task']['prompt_placement'])}",
        f"- seeds: {seeds}; test rows per task at most "
        f"{values(lambda c: c['task']['max_test_examples'] or 'all')}",
        f"- {len(rows)} cells, {sum(r['wall_s'] for r in rows) / 3600:.2f} h of cell time in "
        f"{(end - start) / 3600:.2f} h of wall-clock time; gdfo-ray "
        f"{versions.get('gdfo_ray')}, torch {versions.get('torch')}, transformers {versions.get('transformers')}, "
        f"ray {versions.get('ray')}",
    ])


def build_report(results_dir: str, out_dir: Optional[str] = None) -> str:
    """Write ``report.md`` and the PNG plots; returns the path of ``report.md``."""
    rows = read_results(results_dir, "cells")
    if not rows:
        raise GDFOError(f"{results_dir} has no finished cells yet; run `gdfo bench` first.")
    curves = read_results(results_dir, "curves")
    out_dir = out_dir or os.path.join(results_dir, "report")
    plots = plot_curves(rows, curves, out_dir)
    failed_dir = os.path.join(results_dir, "failed")
    failed = sorted(f[:-5] for f in os.listdir(failed_dir)) if os.path.isdir(failed_dir) else []
    missing = [name for name in missing_cells(results_dir, rows) if name not in failed]
    parts = [
        "# Campaign report", "",
        f"Results: `{os.path.abspath(results_dir)}`", "", _setting(rows), "",
        "## Test score (%), mean ± std over seeds", "",
        "Accuracy, F1 for MRPC. † marks a cell with fewer seeds than the others of its task. "
        "The average is over tasks, for methods that have all of them.", "",
        score_table(rows), "",
        "## Cost per run (mean over seeds)", "",
        "Train calls + dev calls, and the wall time of one cell (model loading and test scoring included; "
        "* only resumed cells, whose time counts from the resume).", "",
        cost_table(rows), "",
        "## Best dev score against train calls", "",
        *[f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})" for p in plots], "",
    ]
    if failed:
        parts += ["## Failed cells", "", "Errors are in `failed/<cell>.json`; rerun `gdfo bench` to retry: "
                  + ", ".join(failed), ""]
    if missing:
        parts += ["## Cells not finished", "", f"Asked for but not run to the end ({len(missing)}); rerunning the "
                  "same `gdfo bench` command runs them: " + ", ".join(missing), ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path

