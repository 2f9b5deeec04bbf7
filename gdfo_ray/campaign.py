"""Benchmark campaigns: every (task, seed, method) cell as its own Ray task, results in Parquet.

A campaign directory holds

- ``campaign.yaml``: what was asked (tasks, seeds, methods, budget, the base config);
- ``cells/task=<t>/method=<m>/seed-<s>.parquet``: one row per finished cell (scores,
  calls, timings, and the cell's full config and versions as JSON), a Hive-partitioned
  dataset that ``pyarrow.dataset`` or pandas read in one call;
- ``curves/task=<t>/method=<m>/seed-<s>.parquet``: the cell's history, one row per
  generation (calls, dev score), for the plots of ``gdfo report``;
- ``runs/<task>_<method>_seed<s>/``: each cell's results directory, with the
  checkpoint that lets a cell killed mid-run continue;
- ``failed/<task>_<method>_seed<s>.json``: the error of a cell that failed.

A cell is finished when its ``cells`` file exists; that file is written last and
atomically, so a rerun of the same command skips finished cells and resumes the
rest (a killed campaign loses at most the current generation of each running cell).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from gdfo_ray.config import (DATA_DIR_ENV, RUN_LABELS, GDFOConfig, apply_overrides, build_config_dict,
                             label_settings, load_yaml, setting_differences)
from gdfo_ray.exceptions import ConfigError, GDFOError

SPLIT_SEED_MODES = ("match", "auto")


@dataclass(frozen=True)
class Cell:
    """One run of a campaign. ``label`` is the config's :func:`~gdfo_ray.config.run_label` (``gdfo_random``:
    gdfo with ``harmonize.control=random``); results are filed under it (``method=<label>``)."""

    task: str
    seed: int
    label: str
    config: GDFOConfig

    @property
    def name(self) -> str:
        return f"{self.task}_{self.label}_seed{self.seed}"


@dataclass(frozen=True)
class CampaignConfig:
    """One campaign: the grid, the budget, and where each cell runs.

    Args:
        results_dir: the campaign directory (see the module docstring).
        tasks, seeds, methods: the grid; every combination is one cell.
        budget: ``search.budget_calls`` of every cell (None: the base config's).
        base: the config every cell starts from, as a nested dict (a ``--config``
            YAML with ``--set`` overrides applied).
        split_seeds: ``match`` uses the few-shot split of the run seed and fails if a task
            lacks it; ``auto`` replaces a missing one by the task's first split not used
            by another seed of the campaign (the tasks' seed lists differ: MRPC and SNLI
            have 8 13 42 50 60, the others 13 21 42 87 100). The split used is recorded.
        cell_cpus, cell_gpus: resources of one cell's Ray task; cells run in parallel as
            the cluster's resources allow. The cell's torch uses ``cell_cpus`` threads.
            None: :func:`cell_threads`'s rule, a whole node per cell.
        max_retries: how often Ray reruns a cell whose worker died (it resumes from
            its checkpoint). A cell that raises is not retried; it is recorded as failed.
        ray_address: a cluster to join, or ``local``; as ``pool.ray_address`` of a run.
        reuse: an earlier campaign directory whose finished cells are copied in where every
            setting that can change their result matches (:func:`reuse_cells`).
    """

    results_dir: str
    tasks: tuple
    seeds: tuple
    methods: tuple
    budget: Optional[int] = None
    base: Mapping[str, Any] = field(default_factory=dict)
    split_seeds: str = "auto"
    cell_cpus: Optional[float] = None
    cell_gpus: float = 0.0
    max_retries: int = 1
    ray_address: Optional[str] = None
    reuse: Optional[str] = None

    def __post_init__(self) -> None:
        if self.reuse is not None and not os.path.isdir(os.path.join(self.reuse, "cells")):
            raise ConfigError(f"bench: --reuse {self.reuse!r} is not a campaign directory (it holds no cells/).")
        for name in ("tasks", "seeds", "methods"):
            value = tuple(getattr(self, name))
            if not value:
                raise ConfigError(f"bench: {name} must not be empty.")
            if len(set(value)) != len(value):
                raise ConfigError(f"bench: {name} has repeated entries: {list(value)}.")
            object.__setattr__(self, name, value)
        bad = [m for m in self.methods if m not in RUN_LABELS]
        if bad:
            raise ConfigError(f"bench: methods {bad} are unknown; allowed: {list(RUN_LABELS)}.")
        if self.split_seeds not in SPLIT_SEED_MODES:
            raise ConfigError(f"bench: split_seeds must be one of {list(SPLIT_SEED_MODES)}, got {self.split_seeds!r}.")
        if (self.cell_cpus is not None and self.cell_cpus <= 0) or self.cell_gpus < 0:
            raise ConfigError(f"bench: cell_cpus must be > 0 and cell_gpus >= 0, got {self.cell_cpus}, {self.cell_gpus}.")
        object.__setattr__(self, "results_dir", os.path.abspath(self.results_dir))
        object.__setattr__(self, "base", dict(self.base))


def _available_splits(config: GDFOConfig) -> Optional[list]:
    """The task's few-shot split seeds in a BBT-layout data dir (None: data comes from elsewhere)."""
    root = config.task.resolved_data_dir()
    if config.task.train_file or not root:
        return None
    shots = os.path.join(root, config.task.name, "16-shot")
    if not os.path.isdir(shots):
        return None  # load_task names the problem when the cell runs
    return sorted((int(s) for s in os.listdir(shots) if s.isdigit()))


def plan(campaign: CampaignConfig) -> list[Cell]:
    """Every cell's validated config; a bad value fails here, before any cell runs."""
    cells = []
    bases = {task: GDFOConfig.from_dict(apply_overrides(_merged_base(campaign.base), {"task.name": task}))
             for task in campaign.tasks}
    for task, label in itertools.product(campaign.tasks, campaign.methods):
        base = bases[task]
        assigned: dict[int, int] = {}
        for seed in campaign.seeds:
            # Relative to the campaign directory, so that its results can move; run_cell resolves it.
            overrides = {**label_settings(label), "task.name": task, "seed": int(seed),
                         "output_dir": os.path.join("runs", f"{task}_{label}_seed{seed}"), "pool.backend": "local"}
            if campaign.budget is not None:
                overrides["search.budget_calls"] = campaign.budget
            assigned[seed] = _split_seed(campaign, base, task, seed, assigned)
            overrides["task.split_seed"] = assigned[seed]
            config = GDFOConfig.from_dict(apply_overrides(_merged_base(campaign.base), overrides))
            cells.append(Cell(task, int(seed), label, config))
    return cells


def cell_threads(node_cores: int) -> int:
    """Torch threads (and CPUs) per cell when ``cell_cpus`` is not given: a whole node, one cell at a time.

    Measured with ``benchmarks/campaign_fill.py`` on a 2-core AMD EPYC (docs/performance.md):
    one cell on two threads scored 0.74 calls a second; two cells at once, one thread each,
    0.35 together, each call four times slower than one thread alone. Cells on separate
    nodes still run at once. Measure another machine with the benchmark, and pass
    ``--cell-cpus`` where it says otherwise.
    """
    return max(1, int(node_cores))


def _merged_base(base: Mapping[str, Any]) -> dict:
    return build_config_dict(sections=base)


def _split_seed(campaign: CampaignConfig, base: GDFOConfig, task: str, seed: int, assigned: dict) -> int:
    if base.task.split_seed is not None:
        return base.task.split_seed
    available = _available_splits(base)
    if available is None or seed in available:
        return int(seed)
    if campaign.split_seeds == "match":
        raise ConfigError(
            f"bench: task {task!r} has no few-shot split for seed {seed} (available: {available}). "
            "Either choose seeds every task has, or pass --split-seeds auto to use another split for it."
        )
    taken = set(assigned.values()) | {s for s in campaign.seeds if s in available}
    free = [s for s in available if s not in taken]
    if not free:
        raise ConfigError(f"bench: task {task!r} has only the splits {available}, too few for seeds {list(campaign.seeds)}.")
    return free[0]


def cell_path(results_dir: str, kind: str, cell: Cell) -> str:
    return os.path.join(results_dir, kind, f"task={cell.task}", f"method={cell.label}", f"seed-{cell.seed}.parquet")


def is_finished(results_dir: str, cell: Cell) -> bool:
    return os.path.exists(cell_path(results_dir, "cells", cell))


def _check_finished_config(results_dir: str, cell: Cell) -> None:
    """A finished cell is only skipped if it ran with the config asked for now."""
    differs = _saved_differences(cell_path(results_dir, "cells", cell), cell)
    if differs:
        raise ConfigError(
            f"bench: {cell.name} already finished in {results_dir} with a different config ({differs}). "
            "Either rerun with the same settings, or use another results directory."
        )


def _saved_differences(path: str, cell: Cell) -> list:
    """The settings that can change its result in which the finished cell at ``path`` differs from ``cell``
    (:func:`~gdfo_ray.config.setting_differences`)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    saved = json.loads(table.column("config_json")[0].as_py())
    labels = table.column("test_label")[0].as_py() if "test_label" in table.column_names else None
    return setting_differences(saved, cell.config, finished=True, scored_rows=None if labels is None else len(labels))


def reuse_cells(campaign: CampaignConfig, source_dir: str, say: Callable[[str], None] = print) -> list[str]:
    """Copy into the campaign the cells ``source_dir`` finished with every setting that matters equal.

    A bbt cell of an earlier campaign pairs with a new student's gdfo cells when only the student
    differs. A cell whose settings differ is left to run, and named. Returns the cells copied.
    """
    import shutil

    source_dir = os.path.abspath(source_dir)
    reused = []
    for cell in plan(campaign):
        src = cell_path(source_dir, "cells", cell)
        if is_finished(campaign.results_dir, cell) or not os.path.exists(src):
            continue
        differs = _saved_differences(src, cell)
        if differs:
            say(f"[bench] not reusing {cell.name} from {source_dir}: it differs in {differs}")
            continue
        for kind in ("curves", "cells"):  # the cells file last: its presence marks the cell finished
            target = cell_path(campaign.results_dir, kind, cell)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(cell_path(source_dir, kind, cell), target + ".tmp")
            os.replace(target + ".tmp", target)
        reused.append(cell.name)
    return reused


def data_root(campaign: CampaignConfig) -> Optional[str]:
    """The data root of the campaign's cells, absolute for workers that run elsewhere (None: not a data root)."""
    root = GDFOConfig.from_dict(_merged_base(campaign.base)).task.resolved_data_dir()
    return os.path.abspath(root) if root else None


def portable(value: Any, paths: Mapping[str, str]) -> Any:
    """``value`` (nested dicts, lists, strings) with each absolute path of ``paths`` written as its name.

    >>> portable({"a": "/x/runs/c", "b": ["/d/sst2 (split 13)"]}, {"/x": ".", "/d": "$GDFO_DATA_DIR"})
    {'a': './runs/c', 'b': ['$GDFO_DATA_DIR/sst2 (split 13)']}
    """
    if isinstance(value, str):
        for path, name in sorted(paths.items(), key=lambda kv: -len(kv[0])):
            if path:
                value = value.replace(path.rstrip(os.sep), name)
        return value
    if isinstance(value, dict):
        return {k: portable(v, paths) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, paths) for v in value]
    return value


def run_cell(config_dict: dict, results_dir: str = ".", root: Optional[str] = None) -> dict:
    """One cell, in whatever process runs it: a fresh run, or the continuation of a killed one.

    ``output_dir`` is relative to ``results_dir``; ``root`` is the data root where the config names none.
    """
    from gdfo_ray.api import CHECKPOINT, run, versions

    config = GDFOConfig.from_dict(config_dict)
    here = {"output_dir": os.path.join(results_dir, config.output_dir)}
    if root is not None and not config.task.data_dir:
        here["task.data_dir"] = root
    config = config.with_overrides(here)
    os.makedirs(config.output_dir, exist_ok=True)
    resume = os.path.exists(os.path.join(config.output_dir, CHECKPOINT))
    started = time.time()
    with open(os.path.join(config.output_dir, "log.txt"), "a") as log:
        result = run(config, resume=resume, overwrite=not resume,
                     progress=lambda line: (log.write(line + "\n"), log.flush()))
    preds = np.load(os.path.join(config.output_dir, "test_predictions.npz"))
    return {"summary": result.summary, "history": result.history, "versions": versions(), "resumed": resume,
            "started": started, "finished": time.time(), "host": socket.gethostname(),
            "test_pred": preds["tuned"].tolist(), "test_label": preds["label"].tolist()}


def _cell_row(cell: Cell, out: dict, paths: Mapping[str, str]) -> dict:
    """The cell's Parquet row; ``paths`` are the machine's paths to write by name (see :func:`portable`)."""
    s = portable({**out["summary"], "config": cell.config.to_dict()}, paths)
    test = s["test"]
    score = test["teacher_manual"] if cell.config.method == "manual" else test["teacher_tuned"]
    return {
        "seed": cell.seed, "split_seed": cell.config.task.split_seed, "metric": s["metric"],
        "test_score": float(score), "test_manual": float(test["teacher_manual"]),
        "test_student": float(test["student"]) if "student" in test else None,
        "dev_best": None if s.get("dev_best") is None else float(s["dev_best"]),
        "budget": cell.config.search.budget_calls, "calls": int(s["calls"]), "dev_calls": int(s["dev_calls"]),
        "generations": int(s["generations"]), "wall_s": float(out["finished"] - out["started"]),
        "run_wall_s": float(s.get("wall_s", 0.0)), "s_per_call": s.get("s_per_call"),
        **{key: float(sum(r.get(key, 0.0) for r in out["history"]))
           for key in ("teacher_s", "student_s", "optimizer_s", "eval_s")},
        "teacher": cell.config.model.teacher, "student": cell.config.model.student,
        "control": cell.config.harmonize.control,
        "teacher_dtype": s.get("teacher_info", {}).get("dtype"), "resumed": bool(out["resumed"]),
        "host": out["host"], "started_at": _utc(out["started"]), "finished_at": _utc(out["finished"]),
        "config_json": json.dumps(portable(cell.config.to_dict(), paths)), "versions_json": json.dumps(out["versions"]),
        "summary_json": json.dumps(s, default=float),
        # The tuned prompt's class per test row (the manual prompt's for manual): gdfo report pairs methods on them.
        "test_pred": out.get("test_pred"), "test_label": out.get("test_label"),
        "median_fidelity": s.get("median_fidelity"), "mean_rho": s.get("mean_rho"),
        # The machine the cell ran on and what its arithmetic allows: a teacher's time read against its floor.
        "machine_json": json.dumps(s.get("machine")), "floor_s_per_call": s.get("floor_s_per_call"),
        "s_per_call_over_floor": s.get("s_per_call_over_floor"),
    }


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _write_parquet(path: str, table) -> None:
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def record(results_dir: str, cell: Cell, out: dict, root: Optional[str] = None) -> dict:
    """Write the cell's curve, then its row (last: its presence marks the cell finished).

    Paths under ``results_dir`` are written relative to it, and the data root ``root`` as ``$GDFO_DATA_DIR``.
    """
    import pyarrow as pa

    keys = ("generation", "calls", "dev_calls", "dev_score", "fitness_best", "step_s", "rho", "z_gd_rank", "fidelity")
    curve = {k: [None if r.get(k) is None else float(r[k]) for r in out["history"]] for k in keys}
    curve["seed"] = [cell.seed] * len(out["history"])
    _write_parquet(cell_path(results_dir, "curves", cell),
                   pa.table({k: pa.array(v, pa.int64() if k == "seed" else pa.float64()) for k, v in curve.items()}))
    paths = {os.path.abspath(results_dir): ".", **({root: "$" + DATA_DIR_ENV} if root else {})}
    row = _cell_row(cell, out, paths)
    _write_parquet(cell_path(results_dir, "cells", cell), pa.Table.from_pylist([row]))
    failed = os.path.join(results_dir, "failed", cell.name + ".json")
    if os.path.exists(failed):
        os.remove(failed)
    return row


def _write_campaign_file(campaign: CampaignConfig) -> None:
    import yaml

    os.makedirs(campaign.results_dir, exist_ok=True)
    path = os.path.join(campaign.results_dir, "campaign.yaml")
    data = dataclasses.asdict(campaign)
    data.update(tasks=list(campaign.tasks), seeds=list(campaign.seeds), methods=list(campaign.methods),
                results_dir=".")  # the file lies in it: the folder can move
    if campaign.reuse is not None:  # where the reused cells came from, relative to this campaign
        data["reuse"] = os.path.relpath(os.path.abspath(campaign.reuse), campaign.results_dir)
    root = data_root(campaign)
    data = portable(data, {campaign.results_dir: ".", **({root: "$" + DATA_DIR_ENV} if root else {})})
    data["commit"] = git_commit()
    runs = []
    if os.path.exists(path):  # a campaign directory may grow (more methods, seeds); keep what came before
        with open(path) as f:
            runs = (load_yaml(f) or {}).get("invocations", [])
    runs.append({**data, "at": _utc(time.time())})
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump({"invocations": runs}, f, sort_keys=False)
    os.replace(path + ".tmp", path)


def git_commit() -> Optional[str]:
    """The commit of the gdfo-ray checkout that runs the campaign (None outside a git checkout)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


@dataclass
class CampaignResult:
    finished: list  # rows of the cells that finished in this invocation
    skipped: list  # names of cells finished before
    failed: dict  # name -> error message


def run_campaign(campaign: CampaignConfig, say: Callable[[str], None] = print) -> CampaignResult:
    """Run every unfinished cell as a Ray task; returns what finished, was skipped and failed."""
    from gdfo_ray.distributed import largest_node_cpus, ray_session
    from gdfo_ray.distributed.tasks import as_completed

    # Seed-major order: a campaign stopped early still has whole seeds of every task and method.
    cells = sorted(plan(campaign), key=lambda c: (campaign.seeds.index(c.seed), campaign.tasks.index(c.task),
                                                   campaign.methods.index(c.label)))
    if campaign.reuse is not None:
        reused = reuse_cells(campaign, campaign.reuse, say)
        say(f"[bench] reused {len(reused)} finished cells of {campaign.reuse}" + (f": {', '.join(reused)}" if reused else ""))
    todo, skipped = [], []
    for cell in cells:
        if is_finished(campaign.results_dir, cell):
            _check_finished_config(campaign.results_dir, cell)
            skipped.append(cell.name)
        else:
            todo.append(cell)
    _write_campaign_file(campaign)
    say(f"[bench] {len(cells)} cells: {len(skipped)} finished before, {len(todo)} to run -> {campaign.results_dir}")
    result = CampaignResult([], skipped, {})
    if not todo:
        return result
    root = data_root(campaign)
    by_name = {cell.name: cell for cell in todo}
    t0 = time.time()
    with ray_session(campaign.ray_address):
        cpus = campaign.cell_cpus or cell_threads(largest_node_cpus())
        threads = max(1, int(cpus))  # where it runs: not a setting of the cell's result (config.LOCATION_KEYS)
        say(f"[bench] {cpus:g} CPU(s) and {threads} torch thread(s) per cell"
            + ("" if campaign.cell_cpus else " (cell_threads's rule)"))
        calls = {cell.name: (apply_overrides(cell.config.to_dict(), {"pool.torch_threads": threads}),
                             campaign.results_dir, root) for cell in todo}
        from gdfo_ray.distributed.metrics import CampaignMetrics

        metrics = CampaignMetrics(os.path.basename(os.path.normpath(campaign.results_dir)), len(skipped), len(todo))
        for name, out, error in as_completed(run_cell, calls, num_cpus=cpus,
                                             num_gpus=campaign.cell_gpus, max_retries=campaign.max_retries):
            cell = by_name[name]
            if error is not None:  # a cell's own error: record it, the others go on
                result.failed[cell.name] = _record_failure(campaign.results_dir, cell, error)
                say(f"[bench] FAILED {cell.name}: {result.failed[cell.name].splitlines()[0]}")
                metrics.finished(failed=True)
                continue
            row = record(campaign.results_dir, cell, out, root)
            metrics.finished()
            result.finished.append({"task": cell.task, "method": cell.label, **row})
            done = len(result.finished) + len(result.failed)
            eta = (time.time() - t0) / done * (len(todo) - done)
            say(f"[bench] {done}/{len(todo)} {cell.name}: test {row['metric']} {row['test_score']:.4f}, "
                f"{row['calls']} calls, {row['wall_s']:.0f} s{' (resumed)' if out['resumed'] else ''}"
                f" | about {eta / 60:.0f} min left")
    return result


def _record_failure(results_dir: str, cell: Cell, error: Exception) -> str:
    cause = getattr(error, "cause", None) or error  # a RayTaskError carries the cell's own exception
    message = f"{type(cause).__name__}: {cause}"
    os.makedirs(os.path.join(results_dir, "failed"), exist_ok=True)
    with open(os.path.join(results_dir, "failed", cell.name + ".json"), "w") as f:
        json.dump({"cell": cell.name, "error": message, "traceback": "".join(traceback.format_exception(error)),
                   "config": cell.config.to_dict()}, f, indent=2)
    return message


def read_results(results_dir: str, kind: str = "cells") -> list[dict]:
    """The rows of a campaign's ``cells`` or ``curves`` dataset, partition columns included."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    path = os.path.join(results_dir, kind)
    if not os.path.isdir(path):
        raise GDFOError(f"{results_dir} holds no {kind}/ dataset; is it a campaign directory of `gdfo bench`?")
    files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names if f.endswith(".parquet")]
    if not files:
        return []
    # Cells written by different versions may differ in columns: read them all under the union of the schemas.
    keys = pa.schema([("task", pa.string()), ("method", pa.string())])
    schema = pa.unify_schemas([pq.read_schema(f) for f in files] + [keys])
    dataset = ds.dataset(files, schema=schema, format="parquet", partition_base_dir=path,
                         partitioning=ds.partitioning(keys, flavor="hive"))
    return dataset.to_table().to_pylist()


def seeds_from(values: Sequence[str]) -> tuple:
    try:
        return tuple(int(v) for v in values)
    except ValueError as e:
        raise ConfigError(f"bench: seeds must be integers, got {list(values)}.") from e
