"""``run(config)``: one run, from data to a results directory.

The results directory holds ``config.yaml`` (resolved), ``versions.json``,
``history.parquet`` (one row per generation), ``best_prompt.json``,
``student.pt`` (kd, gdfo), ``summary.json`` (test scores) and ``checkpoint.pkl``,
rewritten atomically after every generation so that ``resume=True`` continues
from the last completed one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np

from gdfo_ray.config import GDFOConfig, setting_differences
from gdfo_ray.driver import Driver
from gdfo_ray.exceptions import ResumeError
from gdfo_ray.losses import metric
from gdfo_ray.prompt import make_space, save_prompt
from gdfo_ray.tasks import load_task

CHECKPOINT = "checkpoint.pkl"


@dataclass
class RunResult:
    output_dir: str
    summary: dict
    history: list
    best_z: Optional[np.ndarray]


def versions() -> dict:
    """Versions of everything that shapes a result."""
    import cma
    import pyarrow
    import torch
    import transformers

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "numpy": np.__version__,
           "torch": torch.__version__, "transformers": transformers.__version__, "cma": cma.__version__,
           "pyarrow": pyarrow.__version__}
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        out["ray"] = None
    from gdfo_ray.version import __version__

    out["gdfo_ray"] = __version__
    return out


def run_machine(config: GDFOConfig) -> dict:
    """The machine this run's driver is on, its matmul rate measured in the dtype and on the device the
    teacher computes in here (a service's own machine is not known)."""
    from gdfo_ray.machine import describe_machine
    from gdfo_ray.models import pick_device, resolve_dtype, set_threads

    set_threads(config.pool.torch_threads)
    device = pick_device(config.model.device)
    return describe_machine(resolve_dtype(config.model.dtype, device), str(device))


def _atomic_write(path: str, write: Callable) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def saved_run_config(out: str) -> Optional[dict]:
    """The config a run in ``out`` was saved with (its checkpoint's), or None when ``out`` holds no run."""
    path = os.path.join(out, CHECKPOINT)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return pickle.load(f)["config"]


def _prepare_output(config: GDFOConfig, out: str, resume: bool, overwrite: bool) -> Optional[dict]:
    """Create or check the directory; returns the checkpoint to resume from, if any."""
    ckpt_path = os.path.join(out, CHECKPOINT)
    exists = os.path.exists(ckpt_path)
    if exists and not (resume or overwrite):
        raise ResumeError(
            f"{out} already holds a run. Either pass --resume to continue it, --overwrite to start over, "
            "or choose another --output-dir."
        )
    os.makedirs(out, exist_ok=True)
    if not (exists and resume):
        return None
    with open(ckpt_path, "rb") as f:
        checkpoint = pickle.load(f)
    differs = setting_differences(checkpoint["config"], config)
    if differs:
        raise ResumeError(
            f"Cannot resume {out}: the config differs from the saved run in {differs}. Either resume with "
            "the same settings or choose another --output-dir."
        )
    return checkpoint


def _write_history(out: str, history: list, config: GDFOConfig) -> None:
    """One row per generation; the file carries its run's config, so it stands alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = sorted({k for row in history for k in row})
    columns = {k: [row.get(k) for row in history] for k in keys}
    table = pa.table({k: pa.array([None if v is None else float(v) for v in vals], pa.float64())
                      for k, vals in columns.items()})
    table = table.replace_schema_metadata({"gdfo_config": json.dumps(config.to_dict())})
    _atomic_write(os.path.join(out, "history.parquet"), lambda f: pq.write_table(table, f))


def format_progress(row: dict, budget: int) -> str:
    parts = [f"gen {row['generation']:3d}", f"calls {row['calls']}/{budget}",
             f"best {row['fitness_best']:.4f}"]
    if "fitness_mean" in row:
        parts.append(f"pop mean {row['fitness_mean']:.4f}")
    for key, label in (("dev_score", "dev"), ("rho", "rho"), ("fidelity", "fid"), ("kd_loss", "kd")):
        if row.get(key) is not None and np.isfinite(row[key]):
            parts.append(f"{label} {row[key]:+.3f}" if key in ("rho", "fidelity") else f"{label} {row[key]:.3f}")
    parts.append(f"{row['step_s']:.1f}s")
    return " | ".join(parts)


def run(config: GDFOConfig, *, resume: bool = False, overwrite: bool = False,
        progress: Optional[Callable[[str], None]] = print) -> RunResult:
    """Run one method on one task and write its results directory.

    Args:
        config: the run's configuration.
        resume: continue from the last completed generation in ``config.output_dir``.
        overwrite: start over in a directory that already holds a run.
        progress: called with one line per generation (None: silent).

    Raises:
        ResumeError: the directory holds a run and neither resume nor overwrite was asked,
            or resume was asked with a different config.
        ConfigError, DataError, ModelNotFoundError, TeacherError: see their docstrings.
    """
    say = progress or (lambda _: None)
    started = time.time()
    out = config.output_dir or config.default_output_dir()
    data = load_task(config.task, config.seed)  # bad task input fails before anything is written
    checkpoint = _prepare_output(config, out, resume, overwrite)
    import yaml

    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump({**config.to_dict(), "output_dir": out}, f, sort_keys=False)
    machine = run_machine(config)
    with open(os.path.join(out, "versions.json"), "w") as f:
        json.dump({**versions(), "seeds": dataclasses.asdict(config.seeds), "machine": machine}, f, indent=2)
    say(f"[gdfo] {config.method} on {data.spec.name}: {len(data.train)} train / {len(data.dev)} dev / "
        f"{len(data.test)} test rows from {data.source}")
    if checkpoint is not None:
        s = checkpoint["state"]
        say(f"[gdfo] resuming {out} after generation {s.generation} ({s.budget.spent} calls spent)")

    def save(driver: Driver, row: dict) -> None:
        say(format_progress(row, config.search.budget_calls))
        payload = {"config": config.to_dict(), "state": driver.state, "student": driver.student_checkpoint()}
        _atomic_write(os.path.join(out, CHECKPOINT), lambda f: pickle.dump(payload, f))
        _write_history(out, driver.state.history, config)

    with open_run(config, data, checkpoint=checkpoint, hooks=(save,)) as driver:
        driver.run()
        driver.close()  # the student's last steps are in: it can be scored and saved
        summary = _finish(config, driver, data, driver.teacher, driver.student, driver.space, out, say)
    summary["teacher_info"] = dataclasses.asdict(driver.teacher_info)  # hidden size, dtype the black box computed in
    summary["machine"] = machine
    if driver.floor_flops is not None and summary.get("s_per_call"):
        # The rate measured in the teacher's process once it was loaded; the driver's, taken while actors
        # start beside it, read 30% low on 2 cores.
        rate = driver.floor_rate or machine["matmul_gflops"] * 1e9
        floor = driver.floor_flops / rate
        summary["teacher_matmul_gflops"] = round(rate / 1e9, 1)
        summary["floor_s_per_call"], summary["s_per_call_over_floor"] = floor, summary["s_per_call"] / floor
    summary["wall_s"] = time.time() - started
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    say(f"[gdfo] results in {out}")
    return RunResult(out, summary, driver.state.history, driver.best_z)


@contextlib.contextmanager
def open_run(config: GDFOConfig, data, *, checkpoint: Optional[dict] = None, hooks: tuple = (),
             reserve_calls: Optional[Callable[[int], bool]] = None, limiter_actor: Any = None,
             token: Optional[str] = None) -> Iterator[Driver]:
    """Config in, a ready driver with its pools out: the one way a run is built (``run``, Tune's trials).

    ``checkpoint`` (``{"state", "student"}``) resumes; ``hooks`` and ``reserve_calls`` go to the
    :class:`~gdfo_ray.driver.Driver`; ``limiter_actor`` and ``token`` to the pools. On exit
    the driver is closed, the pools' actors are shut down, and a Ray started here stops.
    """
    teacher, student, ray_started = _make_pools(config, data, limiter_actor=limiter_actor, token=token)
    recorder = None
    if config.model.record_answers is not None:
        from gdfo_ray.teachers.playback import Recorder

        teacher = recorder = Recorder(teacher, config.model.record_answers)
    try:
        teacher.check()  # what the black box would refuse is found before the first paid call
        info, space = build_space(config, teacher, student)
        state = None
        if checkpoint is not None:
            state = checkpoint["state"]
            if student is not None and checkpoint.get("student") is not None:
                student.load_state(checkpoint["student"])
        if _ray_is_up():  # the run's progress in the Ray dashboard and the cluster's Prometheus
            from gdfo_ray.distributed.metrics import run_metrics

            hooks = (run_metrics(config), *hooks)  # first: a progress line printed after it is already exported
        driver = Driver(config, data, teacher, student, space, state=state, hooks=hooks, reserve_calls=reserve_calls)
        driver.teacher_info = info
        # The work of one train call, for the floor a run's teacher time is read against (a local teacher only).
        counted = config.method not in ("manual", "bbtv2")  # manual pays no train call; bbtv2's prompts are deep
        driver.floor_flops = teacher.flops_per_call("train", driver.train_ids) if counted else None
        driver.floor_rate = teacher.matmul_rate() if driver.floor_flops is not None else None
        try:
            yield driver
        finally:
            driver.close()
    finally:
        if recorder is not None:  # what was paid for is kept, a crash included
            recorder.save()
            teacher = recorder.teacher
        if config.pool.backend == "ray":
            from gdfo_ray.distributed import release_ray_pools

            release_ray_pools(teacher, student, stop_ray=ray_started)


def _ray_is_up() -> bool:
    """Whether this process is connected to Ray (a Ray pool, a campaign's cell, a Tune trial); never imports it."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def build_space(config: GDFOConfig, teacher, student) -> tuple:
    """The run's prompt space from the teacher's ``describe()``, given to a student cut from the teacher.

    Returns ``(teacher info, space)``. Call it before a resumed student loads its state.
    """
    info = teacher.describe()
    space = make_space(config.method, config.prompt, config.seeds.prompt_space, info, teacher.embed_tokens)
    if student is not None and config.model.student_spec.reads_teacher:
        student.set_prompt_space(space.A, space.P0)
    return info, space


def _make_pools(config: GDFOConfig, data, limiter_actor=None, token: Optional[str] = None):
    """The teacher pool and student group of ``config.pool``.

    ``limiter_actor`` shares a rate limit beyond this run; ``token`` is the service's, when
    it was read elsewhere (a Tune driver passing it to its trials).
    """
    if config.pool.backend == "local":
        from gdfo_ray.ratelimit import LocalLimiter
        from gdfo_ray.student import StudentGroup, make_student
        from gdfo_ray.teachers import TeacherPool, make_teacher

        p = config.pool
        limiter = (LocalLimiter(p.calls_per_s, p.max_in_flight, p.rate_burst)
                   if p.limited else None)
        if limiter_actor is not None:
            from gdfo_ray.distributed import SharedLimiter  # a Tune trial's share of the sweep's limiter

            limiter = SharedLimiter(limiter_actor, counts_in_flight=p.max_in_flight is not None)
        teacher = TeacherPool([make_teacher(config, data, token=token, limiter=limiter)],
                              one_call_per_piece=config.model.teacher_is_service)
        student = StudentGroup([make_student(config, data)]) if config.uses_student else None
        return teacher, student, False
    from gdfo_ray.distributed import make_ray_pools

    return make_ray_pools(config, data, limiter_actor=limiter_actor, token=token)


def _finish(config, driver: Driver, data, teacher, student, space, out: str, say) -> dict:
    """Test scores of the manual prompt, the tuned prompt and the student; saves prompt and student."""
    s = driver.state
    say(f"[gdfo] scoring on {len(data.test)} test rows")
    manual, _, manual_pred = driver.score_prompt(None, "test")
    if config.method == "manual" and s.best_dev[0] is None and s.budget.dev_calls == 0:
        # The manual prompt's dev score: the baseline a campaign's dev-score plots draw beside the searches.
        s.best_dev = (None, driver.evaluate_prompt(None, "dev")[0], float("inf"))
        s.budget.dev_calls += 1
    z = driver.best_z
    tuned, _, tuned_pred = (manual, None, manual_pred) if z is None else driver.score_prompt(z, "test")
    test = {"teacher_manual": manual, "teacher_tuned": tuned}
    # Per-row answers, so that a campaign can pair methods row by row (gdfo report's bootstrap).
    np.savez_compressed(os.path.join(out, "test_predictions.npz"), label=np.asarray(data.test.label),
                        manual=manual_pred.astype(np.int16), tuned=tuned_pred.astype(np.int16))
    if z is not None:
        save_prompt(os.path.join(out, "best_prompt.json"), z, space,
                    {"task": data.spec.name, "teacher": config.model.teacher, "method": config.method,
                     "dev_score": s.best_dev[1]})
    if student is not None and z is not None:
        logits = student.predict(z, "test", np.arange(len(data.test)))
        if logits is not None:  # a GP student models the train batch alone
            test["student"] = metric(logits, data.test.label, data.spec.metric)
        import torch

        torch.save(student.state(), os.path.join(out, "student.pt"))
    hist = s.history
    rhos = [r["rho"] for r in hist if r.get("rho") is not None]
    fids = [r["fidelity"] for r in hist if r.get("fidelity") is not None and np.isfinite(r["fidelity"])]
    teacher_s = sum(r.get("teacher_s", 0.0) for r in hist)
    summary = {
        "task": data.spec.name, "method": config.method, "seed": config.seed, "metric": data.spec.metric,
        "test": test, "dev_best": s.best_dev[1] if np.isfinite(s.best_dev[1]) else None,
        "calls": s.budget.spent, "dev_calls": s.budget.dev_calls, "generations": s.generation,
        "mean_rho": float(np.mean(rhos)) if rhos else None,
        "median_fidelity": float(np.median(fids)) if fids else None,
        "s_per_call": teacher_s / s.budget.spent if s.budget.spent else None,
        "data_source": data.source, "config": config.to_dict(),
    }
    say("[gdfo] test {}: manual prompt {:.4f} | tuned prompt {:.4f}{}".format(
        data.spec.metric, manual, tuned, f" | student {test['student']:.4f}" if "student" in test else ""))
    return summary
