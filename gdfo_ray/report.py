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
from typing import Callable, Optional, Sequence

import numpy as np

from gdfo_ray.version import __version__
from gdfo_ray.campaign import git_commit, read_results
from gdfo_ray.config import load_yaml, parse_student, run_label
from gdfo_ray.exceptions import GDFOError

TASK_ORDER = ("sst2", "yelp_polarity", "ag_news", "dbpedia", "mrpc", "snli", "rte")
TASK_TITLES = {"sst2": "SST-2", "yelp_polarity": "Yelp P.", "ag_news": "AG News", "dbpedia": "DBPedia",
               "mrpc": "MRPC", "snli": "SNLI", "rte": "RTE"}
# Rows are keyed by run label (config.run_label): a method, or gdfo with its random-direction control.
GDFO_RANDOM = run_label("gdfo", "random")
METHOD_ORDER = ("manual", "bbt", "bbtv2", "lq_cma", "kd", "gdfo", GDFO_RANDOM, "white_box")


def _ordered(values: Sequence[str], order: Sequence[str]) -> list:
    known = [v for v in order if v in values]
    return known + sorted(v for v in values if v not in order)


def _cell(scores: list) -> str:
    a = 100 * np.asarray(scores, dtype=float)
    return f"{a.mean():.2f} ± {a.std(ddof=1):.2f}" if len(a) > 1 else f"{a.mean():.2f}"


def _by_cell(rows: list[dict]) -> tuple[list, list, dict]:
    """Tasks and methods in report order, and each (method, task)'s rows."""
    tasks = _ordered({r["task"] for r in rows}, TASK_ORDER)
    methods = _ordered({r["method"] for r in rows}, METHOD_ORDER)
    by = defaultdict(list)
    for r in rows:
        by[(r["method"], r["task"])].append(r)
    return tasks, methods, by


def score_table(rows: list[dict], value: str = "test_score") -> str:
    """Markdown: methods x tasks, mean ± std over seeds (in percent) and the average column."""
    tasks, methods, cells_rows = _by_cell(rows)
    by = defaultdict(list, {key: [float(r[value]) for r in rs if r.get(value) is not None]
                            for key, rs in cells_rows.items()})
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


def _grid(rows: list[dict], cell: Callable[[list[dict]], str]) -> str:
    """Markdown: one row per method, one column per task, ``cell(rows of that method and task)`` in each."""
    tasks, methods, by = _by_cell(rows)
    lines = ["| method | " + " | ".join(TASK_TITLES.get(t, t) for t in tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for m in methods:
        cells = [cell(by[(m, t)]) if by.get((m, t)) else "–" for t in tasks]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(rows: list[dict]) -> str:
    """Markdown: per method and task, mean train calls + dev calls and mean wall time of a cell."""

    def cell(rs: list[dict]) -> str:
        calls = np.mean([r["calls"] for r in rs])
        dev = np.mean([r["dev_calls"] for r in rs])
        # A resumed cell's wall time covers only what ran after the resume: used only when nothing else is.
        whole = [r["wall_s"] for r in rs if not r.get("resumed")]
        time_s = f"{np.mean(whole):.0f} s" if whole else f"{np.mean([r['wall_s'] for r in rs]):.0f} s*"
        over = [r["s_per_call_over_floor"] for r in rs if r.get("s_per_call_over_floor") is not None]
        return f"{calls:.0f}+{dev:.0f} calls, {time_s}" + (f", {np.median(over):.2f}x floor" if over else "")

    return _grid(rows, cell)


def machine_lines(rows: list[dict]) -> str:
    """The machines the cells ran on, and the campaign's median teacher time per call over its floor."""
    machines: dict = {}
    for r in rows:
        m = json.loads(r.get("machine_json") or "null")
        if m is not None:
            key = (m["cpu"], m["cores"], m.get("gpu"), m["matmul_dtype"])
            machines.setdefault(key, []).append(m["matmul_gflops"])
    if not machines:
        return "The cells do not record their machine (written before gdfo-ray recorded it)."
    lines = [f"- {cpu}, {cores} cores{', GPU ' + gpu if gpu else ''}: {len(rates)} cells, matmul "
             f"{np.median(rates):.0f} GFLOP/s in {dtype}" for (cpu, cores, gpu, dtype), rates in sorted(machines.items())]
    over = [r["s_per_call_over_floor"] for r in rows if r.get("s_per_call_over_floor") is not None]
    if over:
        lines.append(f"- teacher time per call over its floor (the call's work at the measured matmul rate): median "
                     f"{np.median(over):.2f}x over {len(over)} cells, {min(over):.2f}x to {max(over):.2f}x")
    return "\n".join(lines)


# Which side of a pair is the subject (A in "A − B"): the method listed first here.
PAIR_PRIORITY = ("gdfo", GDFO_RANDOM, "kd", "lq_cma", "bbtv2", "bbt", "white_box", "manual")
BOOTSTRAP_RESAMPLES = 2000


def _metric(pred: np.ndarray, label: np.ndarray, name: str) -> np.ndarray:
    """The metric per row of ``pred``/``label`` arrays ``(..., n)``: accuracy, or F1 with class 1 positive."""
    if name == "accuracy":
        return (pred == label).mean(-1)
    tp = ((pred == 1) & (label == 1)).sum(-1)
    fp = ((pred == 1) & (label != 1)).sum(-1)
    fn = ((pred != 1) & (label == 1)).sum(-1)
    return np.where(tp == 0, 0.0, 2 * tp / np.maximum(2 * tp + fp + fn, 1))


def _row_bootstrap(a: np.ndarray, b: np.ndarray, label: np.ndarray, name: str, n: int,
                   rng: np.random.Generator) -> np.ndarray:
    """``n`` resampled differences metric(a) − metric(b) on one test set, both scored on the same rows."""
    out = np.empty(n)
    chunk = max(1, 2_000_000 // max(len(label), 1))
    for start in range(0, n, chunk):
        idx = rng.integers(0, len(label), size=(min(chunk, n - start), len(label)))
        out[start:start + len(idx)] = _metric(a[idx], label[idx], name) - _metric(b[idx], label[idx], name)
    return out


def paired_differences(rows: list[dict], a: str, b: str, n_boot: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> Optional[dict]:
    """Mean paired difference A − B in test score, per task and averaged over tasks, with 95% intervals.

    Cells pair on (task, seed). The interval is a percentile bootstrap that resamples seeds
    within each task and, within each seed, the test rows (the same rows for A and B), so it
    covers both the seed-to-seed spread and the finite test set. Cells without per-row
    predictions (written before they were recorded) resample seeds only.
    """
    rng = np.random.default_rng(seed)
    cells = {(r["task"], int(r["seed"])): r for r in rows if r["method"] == a}
    others = {(r["task"], int(r["seed"])): r for r in rows if r["method"] == b}
    shared = sorted(set(cells) & set(others))
    if not shared:
        return None
    tasks = _ordered({t for t, _ in shared}, TASK_ORDER)
    per_task, boots, rows_resampled = {}, [], True
    for task in tasks:
        seeds = [s for t, s in shared if t == task]
        draws = []  # (seed, n_boot) resampled differences
        observed = []
        for s in seeds:
            ra, rb = cells[(task, s)], others[(task, s)]
            observed.append(float(ra["test_score"]) - float(rb["test_score"]))
            if ra.get("test_pred") is not None and rb.get("test_pred") is not None:
                label = np.asarray(ra["test_label"])
                draws.append(_row_bootstrap(np.asarray(ra["test_pred"]), np.asarray(rb["test_pred"]), label,
                                            ra["metric"], n_boot, rng))
            else:
                rows_resampled = False
                draws.append(np.full(n_boot, observed[-1]))
        draws = np.asarray(draws)
        pick = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
        task_boot = draws[pick, np.arange(n_boot)[:, None]].mean(1)
        boots.append(task_boot)
        per_task[task] = {"diff": float(np.mean(observed)), "lo": float(np.percentile(task_boot, 2.5)),
                          "hi": float(np.percentile(task_boot, 97.5)), "seeds": len(seeds)}
    overall = np.mean(boots, axis=0)
    diffs = [v["diff"] for v in per_task.values()]
    return {"a": a, "b": b, "tasks": per_task, "diff": float(np.mean(diffs)),
            "lo": float(np.percentile(overall, 2.5)), "hi": float(np.percentile(overall, 97.5)),
            "a_wins": sum(d > 0 for d in diffs), "b_wins": sum(d < 0 for d in diffs),
            "cells": len(shared), "rows_resampled": rows_resampled}


def method_pairs(rows: list[dict]) -> list[tuple[str, str]]:
    """Every pair of methods present, the one earlier in :data:`PAIR_PRIORITY` first (gdfo vs the rest)."""
    methods = _ordered({r["method"] for r in rows}, PAIR_PRIORITY)
    return [(methods[i], methods[j]) for i in range(len(methods)) for j in range(i + 1, len(methods))]


def _pp(x: float) -> str:
    return f"{100 * x:+.2f}"


def _excludes_zero(v: dict) -> bool:
    return v["lo"] > 0 or v["hi"] < 0


def _interval(v: Optional[dict], bold: bool = False) -> str:
    """A paired difference as ``+d [lo, hi]`` in points; ``bold`` marks it where its interval excludes zero."""
    if v is None:
        return "–"
    b = "**" if bold and _excludes_zero(v) else ""
    return f"{b}{_pp(v['diff'])}{b} [{_pp(v['lo'])}, {_pp(v['hi'])}]"


def paired_table(rows: list[dict], n_boot: int = BOOTSTRAP_RESAMPLES) -> str:
    """Markdown: per method pair, the mean paired difference with its 95% interval, wins, and per task."""
    results = [r for r in (paired_differences(rows, a, b, n_boot) for a, b in method_pairs(rows)) if r]
    if not results:
        return "No two methods share a task and seed."
    tasks = _ordered({t for r in results for t in r["tasks"]}, TASK_ORDER)
    lines = ["| A − B | cells | mean diff (points) | 95% CI | tasks A wins / B wins | "
             + " | ".join(TASK_TITLES.get(t, t) for t in tasks) + " |", "|" + "---|" * (len(tasks) + 5)]
    for r in results:
        cells = [_interval(r["tasks"].get(t)) for t in tasks]
        excludes = "**" if _excludes_zero(r) else ""
        note = "" if r["rows_resampled"] else " (seeds only)"
        if min(v["seeds"] for v in r["tasks"].values()) < 2:
            note += " (1 seed: test rows only)"
        lines.append(f"| {r['a']} − {r['b']} | {r['cells']} | {excludes}{_pp(r['diff'])}{excludes} | "
                     f"[{_pp(r['lo'])}, {_pp(r['hi'])}]{note} | {r['a_wins']} / {r['b_wins']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def calls_to_reach(rows: list[dict], curves: list[dict], reference: str = "bbt") -> dict:
    """Per (method, task): train calls each seed needed to reach ``reference``'s final best dev score.

    The target is paired: seed s of a method must reach what ``reference`` reached with seed s.
    Returns ``{(method, task): (calls of the seeds that reached it, number of seeds)}``.
    """
    by = defaultdict(list)
    for r in curves:
        by[(r["task"], r["method"], int(r["seed"]))].append(r)
    targets = {}
    for (task, method, seed), curve in by.items():
        if method == reference:
            calls, best = _best_so_far(curve)
            if len(best):
                targets[(task, seed)] = best[-1]
    out = defaultdict(lambda: ([], 0))
    for r in rows:
        key = (r["task"], int(r["seed"]))
        if key not in targets:
            continue
        reached, n = out[(r["method"], r["task"])]
        if r["method"] == "manual":
            hit = 0 if r.get("dev_best") is not None and r["dev_best"] >= targets[key] else None
        else:
            calls, best = _best_so_far(by.get((r["task"], r["method"], int(r["seed"])), []))
            ok = np.flatnonzero(best >= targets[key] - 1e-12)
            hit = int(calls[ok[0]]) if len(ok) else None
        out[(r["method"], r["task"])] = (reached + ([hit] if hit is not None else []), n + 1)
    return dict(out)


def reach_table(rows: list[dict], curves: list[dict], reference: str = "bbt") -> str:
    """Markdown: median train calls to reach the reference's final best dev score (seeds that did / all)."""
    reach = calls_to_reach(rows, curves, reference)
    if not reach:
        return f"No cell shares a task and seed with a finished {reference} cell."
    tasks = _ordered({t for _, t in reach}, TASK_ORDER)
    methods = _ordered({m for m, _ in reach}, METHOD_ORDER)
    lines = ["| method | " + " | ".join(TASK_TITLES.get(t, t) for t in tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for m in methods:
        cells = []
        for t in tasks:
            if (m, t) not in reach:
                cells.append("–")
                continue
            hits, n = reach[(m, t)]
            cells.append(f"{np.median(hits):.0f} ({len(hits)}/{n})" if hits else f"never (0/{n})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def student_table(rows: list[dict]) -> str:
    """Markdown: per student method and task, median fidelity and rho, and teacher vs student seconds/generation."""
    rs = [r for r in rows if json.loads(r["config_json"])["method"] in ("kd", "gdfo")]
    if not rs:
        return "No cell ran a student."

    def cell(group: list[dict]) -> str:
        fid = [r["median_fidelity"] for r in group if r.get("median_fidelity") is not None]
        rho = [r["mean_rho"] for r in group if r.get("mean_rho") is not None]
        gens = [max(int(r["generations"]), 1) for r in group]
        teacher = np.mean([r["teacher_s"] / g for r, g in zip(group, gens)])
        student = np.mean([r["student_s"] / g for r, g in zip(group, gens)])
        parts = [f"fid {np.median(fid):+.2f}" if fid else "fid –"] + ([f"rho {np.median(rho):+.2f}"] if rho else [])
        return ", ".join(parts + [f"{teacher:.1f} s teacher / {student:.1f} s student"])

    return _grid(rs, cell)


def missing_cells(results_dir: str, rows: list[dict]) -> list[str]:
    """Cells some ``gdfo bench`` invocation asked for that have not finished (cut short, or failed)."""
    path = os.path.join(results_dir, "campaign.yaml")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        invocations = (load_yaml(f) or {}).get("invocations", [])
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
        title = TASK_TITLES.get(task, task)
        if any(_oracle(r) for r in rows if r["task"] == task):
            title += f"\n{ORACLE_NOTE}"
        ax.set(title=title, xlabel="train API calls", ylabel=f"best dev {metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"dev_{task}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


ORACLE_NOTE = ("student = oracle (oracle:S: with noise of set amplitude): the black box's own weights, a diagnostic "
               "that breaks the black-box premise")


def _oracle(row: dict) -> bool:
    config = json.loads(row["config_json"])
    return config["method"] in ("kd", "gdfo") and parse_student(config["model"]["student"]).kind == "oracle"


def _setting(rows: list[dict]) -> str:
    configs = [json.loads(r["config_json"]) for r in rows]
    searched = [c for c in configs if c["method"] != "manual"] or configs
    distilled = [c for c in configs if c["method"] in ("kd", "gdfo")]
    versions = json.loads(rows[0]["versions_json"])

    def values(get, among: Optional[list] = None) -> str:
        return ", ".join(sorted({str(get(c)) for c in (searched if among is None else among)}))

    student = values(lambda c: c["model"]["student"], distilled) if distilled else "none (no cell distils one)"
    if any(_oracle(r) for r in rows):
        student += f" (**{ORACLE_NOTE}**)"

    seeds = sorted({int(r["seed"]) for r in rows})
    # Cells record when they finished and how long they ran; the oldest rows have no start time.
    start = min(calendar.timegm(time.strptime(r["finished_at"], "%Y-%m-%dT%H:%M:%SZ")) - r["wall_s"] for r in rows)
    end = max(calendar.timegm(time.strptime(r["finished_at"], "%Y-%m-%dT%H:%M:%SZ")) for r in rows)
    return "\n".join([
        f"- teacher (black box): {values(lambda c: c['model']['teacher'])} "
        f"({', '.join(sorted({str(r['teacher_dtype']) for r in rows}))}); "
        f"student: {student}",
        f"- budget: {values(lambda c: c['search']['budget_calls'])} train calls per run; "
        f"popsize {values(lambda c: c['search']['popsize'] or 'auto')}, d = "
        f"{values(lambda c: c['prompt']['intrinsic_dim'])}, n = {values(lambda c: c['prompt']['n_prompt_tokens'])} "
        f"prompt tokens, prompt placement {values(lambda c: c['task']['prompt_placement'])}",
        f"- seeds: {seeds}; {_test_rows(rows)}",
        f"- {len(rows)} cells, {sum(r['wall_s'] for r in rows) / 3600:.2f} h of cell time in "
        f"{(end - start) / 3600:.2f} h of wall-clock time; gdfo-ray "
        f"{versions.get('gdfo_ray')}, torch {versions.get('torch')}, transformers {versions.get('transformers')}, "
        f"ray {versions.get('ray')}",
    ])


def _test_rows(rows: list[dict]) -> str:
    """How many test rows each task's cells scored, and whether that was a sample."""
    if any(r.get("test_label") is None for r in rows):  # cells from before per-row answers were kept
        caps = sorted({str(json.loads(r["config_json"])["task"]["max_test_examples"] or "all") for r in rows})
        return f"test rows per task at most {', '.join(caps)}"
    parts = []
    for task in dict.fromkeys(r["task"] for r in rows):
        cells = [r for r in rows if r["task"] == task]
        counts = sorted({len(r["test_label"]) for r in cells})
        sampled = any("test subsampled" in json.loads(r["summary_json"]).get("data_source", "") for r in cells)
        parts.append(f"{TASK_TITLES.get(task, task)} {'/'.join(f'{n:,}' for n in counts)}"
                     f"{' (a seeded sample of the test set per seed: task.max_test_examples)' if sampled else ' (all)'}")
    return "test rows scored: " + "; ".join(parts)


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
        f"Results: `{os.path.relpath(os.path.abspath(results_dir), os.path.abspath(out_dir))}` (relative to this "
        "report)", "", _setting(rows), "",
        "## Test score (%), mean ± std over seeds", "",
        "Accuracy, F1 for MRPC. † marks a cell with fewer seeds than the others of its task. "
        "The average is over tasks, for methods that have all of them.", "",
        score_table(rows), "",
        "## Cost per run (mean over seeds)", "",
        "Train calls + dev calls, the wall time of one cell (model loading and test scoring included; "
        "* only resumed cells, whose time counts from the resume), and, where the cells record it, the median "
        "teacher time per call over its floor.", "",
        cost_table(rows), "",
        "## Machines", "",
        machine_lines(rows), "",
        "## Paired differences in test score", "",
        f"A − B in points, paired on (task, seed), averaged over the tasks both ran. 95% CI: percentile "
        f"bootstrap ({BOOTSTRAP_RESAMPLES} resamples) over seeds within each task and, within each seed, over "
        "the test rows, scored on the same rows for A and B. Bold: the interval excludes zero. A task counts as "
        "a win for the side whose mean over seeds is higher.", "",
        paired_table(rows), "",
        "## Train calls to reach bbt's final best dev score", "",
        "Per seed, the target is what bbt reached with that seed by the end of its budget; a cell shows the median "
        "calls over the seeds that reached it, and how many did. Dev calls are not counted; manual needs 0 calls "
        "when its dev score is already there.", "",
        reach_table(rows, curves), "",
        "## The student", "",
        "Median over seeds of each run's median fidelity (Spearman of the student's predicted against the "
        "teacher's fitness of a population, predicted before the student trains on it), of each run's mean rho "
        "(agreement of the gradient with CMA-ES's step), and the mean time per generation spent on the teacher "
        "and on the student.", "",
        student_table(rows), "",
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



def ladder_rows(results_dirs: Sequence[str], n_boot: int = BOOTSTRAP_RESAMPLES,
                control_dir: Optional[str] = None) -> list[dict]:
    """One rung per campaign directory: its student, the median fidelity of its gdfo cells, gdfo − bbt.

    Each directory is one student's campaign (``gdfo bench --set model.student=...``) with bbt
    cells to pair with (run there or copied in by ``--reuse``). A rung without gdfo_random cells
    of its own pairs with those of ``control_dir``: the random control never reads its student,
    so its search is the same whichever student rode along. Rungs come out by fidelity.
    """
    shared_control = ([r for r in read_results(control_dir, "cells") if r["method"] == GDFO_RANDOM]
                      if control_dir else [])
    if control_dir and not shared_control:
        raise GDFOError(f"{control_dir} has no finished {GDFO_RANDOM} cell to serve as the ladder's control.")
    rungs, rung_rows = [], []
    for folder in results_dirs:
        rows = read_results(folder, "cells")
        rung_rows.append(rows)
        own_control = any(r["method"] == GDFO_RANDOM for r in rows)
        gdfo = [r for r in rows if r["method"] == "gdfo"]
        if not gdfo:
            raise GDFOError(f"{folder} has no finished gdfo cell: a rung of the ladder needs gdfo and bbt cells.")
        students = sorted({json.loads(r["config_json"])["model"]["student"] for r in gdfo})
        if len(students) > 1:
            raise GDFOError(f"{folder} holds gdfo cells of several students {students}: one campaign per student.")
        fids = [r["median_fidelity"] for r in gdfo if r.get("median_fidelity") is not None]
        vs_bbt = paired_differences(rows, "gdfo", "bbt", n_boot)
        if vs_bbt is None:
            raise GDFOError(f"{folder} has no bbt cell sharing a task and seed with its gdfo cells.")
        rungs.append({"dir": folder, "student": students[0], "oracle": parse_student(students[0]).kind == "oracle",
                      "fidelity": float(np.median(fids)) if fids else float("nan"), "cells": vs_bbt["cells"],
                      "seeds": sorted({int(r["seed"]) for r in gdfo}), "vs_bbt": vs_bbt,
                      "vs_random": paired_differences(rows if own_control else rows + shared_control, "gdfo",
                                                      GDFO_RANDOM, n_boot),
                      "control": folder if own_control or not shared_control else control_dir,
                      "paired": {(r["task"], int(r["seed"])) for r in gdfo} & {
                          (r["task"], int(r["seed"])) for r in rows if r["method"] == "bbt"}})
    # Rungs may run different seeds (the oracle five, the others three): gdfo − bbt again on the
    # (task, seed) cells every rung has, so that rungs also compare on identical cells.
    shared = set.intersection(*(r["paired"] for r in rungs))
    for r, rows in zip(rungs, rung_rows):
        rows = [x for x in rows if (x["task"], int(x["seed"])) in shared]
        r["vs_bbt_shared"] = paired_differences(rows, "gdfo", "bbt", n_boot) if shared else None
    return sorted(rungs, key=lambda r: (np.nan_to_num(r["fidelity"], nan=-2.0), r["student"]))


def ladder_threshold(rungs: list[dict]) -> str:
    """Where gdfo starts to pay off, as a bracket of fidelity: the least faithful rung from which every more
    faithful one beats bbt, and the most faithful one below it that does not. ``rungs`` are sorted by fidelity.
    A rung below the bracket that beats bbt all the same is named: one threshold of fidelity does not explain it.
    It judges each rung's ``vs_bbt``: pass :func:`_judged` views to judge one task, or the shared cells."""
    def name(r: dict) -> str:
        return f"{r['fidelity']:+.2f} ({r['student']})"

    paying = [r["vs_bbt"]["lo"] > 0 for r in rungs]
    if not any(paying):
        return "gdfo − bbt has an interval above zero at no rung: gdfo does not pay off with any of these students."
    first = len(paying)
    while first > 0 and paying[first - 1]:
        first -= 1
    if first == len(paying):
        return ("gdfo − bbt's interval lies above zero at some rungs but not at the most faithful one: "
                "no threshold of fidelity separates them.")
    if first == 0:
        return f"gdfo − bbt's interval lies above zero at every rung, down to median fidelity {name(rungs[0])}."
    text = (f"gdfo − bbt's interval lies above zero from median fidelity {name(rungs[first])} up, and includes zero "
            f"at {name(rungs[first - 1])}: the threshold lies between.")
    exceptions = [r for r, pays in zip(rungs[:first - 1], paying) if pays]
    if exceptions:
        text += (" Below it, " + ", ".join(name(r) for r in exceptions) + " beat bbt all the same: fidelity alone "
                 "does not decide.")
    else:
        text += " Below it gdfo does not pay off."
    return text


def ladder_report(results_dirs: Sequence[str], out_dir: str, n_boot: int = BOOTSTRAP_RESAMPLES,
                  control_dir: Optional[str] = None) -> str:
    """``ladder.md`` and ``ladder.png``: gdfo − bbt against each student's median fidelity."""
    rungs = ladder_rows(results_dirs, n_boot, control_dir)
    os.makedirs(out_dir, exist_ok=True)

    shared = rungs[0]["vs_bbt_shared"]
    uneven = shared is not None and any(r["vs_bbt_shared"]["cells"] != r["cells"] for r in rungs)
    lines = ["# When does the student's gradient pay off?", "",
             "One rung per student: the median over its gdfo cells of each run's median fidelity, and gdfo − bbt "
             "(and gdfo − its random-direction control) in test points, paired on (task, seed), with "
             "95% bootstrap intervals over seeds and test rows. Bold: the interval excludes zero.", ""]
    head = ["student", "campaign", "seeds", "cells", "median fidelity", "gdfo − bbt [95% CI]"]
    if uneven:
        n = shared["cells"]
        head.append(f"gdfo − bbt on the {n} cell{'s' * (n != 1)} every rung has")
    head.append("gdfo − gdfo_random")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rungs:
        name = f"{r['student']} †" if r["oracle"] else r["student"]
        row = [name, f"`{os.path.relpath(r['dir'], out_dir)}`", " ".join(map(str, r["seeds"])), str(r["cells"]),
               f"{r['fidelity']:+.2f}", _interval(r["vs_bbt"], bold=True)]
        if uneven:
            row.append(_interval(r["vs_bbt_shared"], bold=True))
        c = r["vs_random"]
        row.append(_interval(c, bold=True) + ("" if c is None else f" ({c['cells']} cells)"))
        lines.append("| " + " | ".join(row) + " |")
    if any(r["oracle"] for r in rungs):
        lines += ["", f"† {ORACLE_NOTE}."]
    borrowed = sorted({r["student"] for r in rungs if r["vs_random"] is not None and r["control"] != r["dir"]})
    if borrowed:
        lines += ["", f"gdfo − gdfo_random of {', '.join(borrowed)}: paired with the {GDFO_RANDOM} cells of "
                  f"`{os.path.relpath(control_dir, out_dir)}`. The random control never reads its student, so its "
                  "search is the same whichever student rode along (tests/test_driver.py checks it)."]
    tasks = _ordered({t for r in rungs for t in r["vs_bbt"]["tasks"]}, TASK_ORDER)
    lines += ["", "gdfo − bbt per task, over each rung's own seeds:", "",
              "| student | " + " | ".join(TASK_TITLES.get(t, t) for t in tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for r in rungs:
        lines.append(f"| {r['student']}{' †' if r['oracle'] else ''} | "
                     + " | ".join(_interval(r["vs_bbt"]["tasks"].get(t), bold=True) for t in tasks) + " |")
    lines.append("")
    for t in tasks:  # a threshold can hold on one task and not over all of them
        by_task = _judged(rungs, lambda r: r["vs_bbt"]["tasks"].get(t))
        lines.append(f"- {TASK_TITLES.get(t, t)}: " + ladder_threshold(by_task))
    lines += ["", "Over the tasks: " + ladder_threshold(rungs)]
    if uneven:  # a rung's extra seeds must not be what sets it apart
        n = shared["cells"]
        lines += ["", f"On the {n} cell{'s' * (n != 1)} every rung has: "
                  + ladder_threshold(_judged(rungs, lambda r: r["vs_bbt_shared"]))]
    lines += ["", "![ladder.png](ladder.png)", ""]
    lines += ["Made, from this folder, by", "", "```", _ladder_command(results_dirs, out_dir, control_dir), "```", "",
              f"with gdfo-ray {__version__} at commit {git_commit() or 'unknown'}.", ""]
    _plot_ladder(rungs, os.path.join(out_dir, "ladder.png"))
    path = os.path.join(out_dir, "ladder.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _judged(rungs: list[dict], pick: Callable[[dict], Optional[dict]]) -> list[dict]:
    """The rungs with ``vs_bbt`` replaced by the difference ``pick`` takes from each; rungs without one left out."""
    return [{**r, "vs_bbt": d} for r in rungs if (d := pick(r)) is not None]


def _ladder_command(results_dirs: Sequence[str], out_dir: str, control_dir: Optional[str]) -> str:
    """The command that remakes a ladder page, its paths relative to the page's folder (never a machine's)."""
    rel = [os.path.relpath(d, out_dir) for d in results_dirs]
    control = [] if control_dir is None else ["--control", os.path.relpath(control_dir, out_dir)]
    return " ".join(["gdfo report --ladder", *control, *rel, "--out ."])


def _plot_ladder(rungs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    for r in rungs:
        # A legend rather than labels by the points: most students sit near fidelity 0, where labels collide.
        v = r["vs_bbt"]
        y, lo, hi = 100 * v["diff"], 100 * v["lo"], 100 * v["hi"]
        name = r["student"].rsplit("/", 1)[-1] + (" (not a black box)" if r["oracle"] else "")
        ax.errorbar([r["fidelity"]], [y], yerr=[[y - lo], [hi - y]], fmt="s" if r["oracle"] else "o", capsize=4,
                    label=f"{name}, {len(r['seeds'])} seeds: {y:+.2f}")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.margins(x=0.1)
    # Beside the axes: any corner inside them may hide an interval.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set(xlabel="median fidelity of the student (Spearman)", ylabel="gdfo − bbt, test points (95% CI)",
           title="gdfo − bbt against the student's fidelity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
