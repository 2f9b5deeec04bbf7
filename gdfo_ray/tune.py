"""``gdfo tune``: Ray Tune over a method's hyperparameters, Optuna proposing and ASHA stopping.

Each trial is one run of the driver on the train batch that reports, every
generation, the best dev score so far against the calls spent (ASHA's clock). The
dev set selects; the test set is never scored. A trial reserves what its actors
need as one placement group, so trials never wait on each other's actors. Trials
querying one service share a rate limiter and, with ``total_calls``, one budget:
a trial reserves each generation's calls before dispatching them and stops when
the sweep's budget is spent. Every generation writes a checkpoint, so
``Tuner.restore`` continues a sweep killed halfway (``gdfo tune --resume``).

Outputs, in ``<storage>/<name>/``: Tune's experiment state, ``trials.parquet``
(one row per trial: parameters, best dev score, calls, status) and
``best_config.yaml``, which ``gdfo run --config`` accepts.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from gdfo_ray.config import GDFOConfig, apply_overrides, flatten_config, load_yaml
from gdfo_ray.exceptions import ConfigError, GDFOError

METRIC = "dev_score"
TIME_ATTR = "calls"
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")

# Hyperparameters of docs/method.md, as dotted config keys; popsize is capped by the budget at build time.
COMMON_SPACE = {
    "search.sigma0": {"loguniform": [0.1, 3.0]},
    "search.popsize": {"randint": [6, 31]},
    "prompt.alpha": {"loguniform": [0.3, 3.0]},
    "prompt.intrinsic_dim": {"choice": [50, 100, 200, 500]},
    "prompt.n_prompt_tokens": {"choice": [5, 10, 20, 50]},
    "search.loss": {"choice": ["ce", "hinge"]},
}
STUDENT_SPACE = {
    "student.tau": {"loguniform": [0.5, 8.0]},
    "student.beta": {"uniform": [0.0, 1.0]},
    "student.lr": {"loguniform": [1e-4, 1e-2]},
}
HARMONIZE_SPACE = {"harmonize.eta": {"uniform": [0.0, 2.0]}, "harmonize.gamma": {"uniform": [0.0, 1.0]}}


def default_space(method: str) -> dict:
    """The searched hyperparameters of a method (docs/method.md): CMA-ES and prompt space, plus its own."""
    if method in ("manual", "white_box"):
        raise ConfigError(f"Method {method!r} has nothing to tune by black-box search; choose bbt, bbtv2, kd or gdfo.")
    space = dict(COMMON_SPACE)
    if method in ("kd", "gdfo"):
        space.update(STUDENT_SPACE)
    if method == "gdfo":
        space.update(HARMONIZE_SPACE)
    return space


def validate_space(space: Mapping[str, Any], base: dict) -> dict:
    """``{dotted.key: {distribution: args}}``, keys checked against the config, values against the form."""
    if not space:
        raise ConfigError("tune: the search space is empty; give at least one {dotted.key: {distribution: args}}.")
    out = {}
    for key, spec in space.items():
        apply_overrides(copy.deepcopy(base), {key: None})  # names an unknown key with the valid ones
        if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(
                f"tune space entry {key!r} must be one mapping {{distribution: arguments}} with distribution one of "
                f"{list(DISTRIBUTIONS)}, e.g. {{loguniform: [0.1, 3.0]}}; got {spec!r}."
            )
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(args, (list, tuple)) or not args:
                raise ConfigError(f"tune space {key!r}: choice needs a non-empty list, got {args!r}.")
        elif not (isinstance(args, (list, tuple)) and len(args) == 2 and args[0] < args[1]):
            raise ConfigError(f"tune space {key!r}: {kind} needs [low, high] with low < high, got {args!r}.")
        elif kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"tune space {key!r}: loguniform needs low > 0, got {args!r}.")
        out[key] = {kind: list(args)}
    return out


def base_point(space: Mapping[str, Any], base: Mapping[str, Any]) -> Optional[dict]:
    """The base config's own values of the searched keys, where every one lies in the space (else None).

    The sweep's first trial, so that what it finds is compared with what the base
    config already does (for the update's search: today's update, on the same seeds).
    """
    flat = flatten_config(GDFOConfig.from_dict(dict(base)).to_dict())
    point = {}
    for key, spec in space.items():
        (kind, args), = spec.items()
        value = flat.get(key)
        inside = value in args if kind == "choice" else (
            isinstance(value, (int, float)) and not isinstance(value, bool) and args[0] <= value <= args[1]
            and (kind != "randint" or value < args[1]))
        if not inside:
            return None
        point[key] = value
    return point


def _tune_space(space: Mapping[str, Any]) -> dict:
    from ray import tune

    build = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint,
             "choice": tune.choice}
    return {key: (build[kind](args) if kind == "choice" else build[kind](*args))
            for key, spec in space.items() for kind, args in spec.items()}


@dataclass(frozen=True)
class TuneSettings:
    """One sweep.

    Args:
        base: the config every trial starts from (nested dict); its ``search.budget_calls``
            is each trial's budget, and ASHA's maximum time.
        space: ``{dotted key: {distribution: args}}``; None: :func:`default_space` of the method.
        num_samples: trials.
        storage_dir, name: the experiment lives in ``storage_dir/name``.
        max_concurrent: trials at once (None: as the cluster's resources allow).
        grace_calls: calls a trial always gets before ASHA may stop it (None: a quarter of the budget).
        reduction_factor: ASHA keeps the best 1/reduction_factor at each rung.
        total_calls: train calls all trials together may spend (None: num_samples x budget).
        trial_cpus, trial_gpus: resources of a trial whose pool runs in-process (``pool.backend=local``);
            with ``ray``, the placement group is one bundle for the trial plus one per actor.
        seed: Optuna's sampler seed (the trials' own seed is ``base['seed']``).
    """

    base: Mapping[str, Any]
    space: Optional[Mapping[str, Any]] = None
    num_samples: int = 8
    storage_dir: str = "tune_results"
    name: str = "gdfo_tune"
    max_concurrent: Optional[int] = None
    grace_calls: Optional[int] = None
    reduction_factor: int = 3
    total_calls: Optional[int] = None
    trial_cpus: float = 2.0
    trial_gpus: float = 0.0
    seed: int = 0
    _config: GDFOConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        config = GDFOConfig.from_dict(dict(self.base))
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "storage_dir", os.path.abspath(self.storage_dir))
        space = validate_space(self.space if self.space is not None else default_space(config.method), dict(self.base))
        if "search.popsize" in space and "randint" in space["search.popsize"]:  # a generation must fit the budget
            low, high = space["search.popsize"]["randint"]
            high = min(high, config.search.budget_calls + 1)
            if high <= low:
                raise ConfigError(f"tune: search.budget_calls={config.search.budget_calls} is below the smallest "
                                  f"popsize {low} of the space. Raise --budget or narrow search.popsize.")
            space["search.popsize"] = {"randint": [low, high]}
        object.__setattr__(self, "space", space)
        if self.num_samples < 1:
            raise ConfigError(f"tune: num_samples must be >= 1, got {self.num_samples}.")
        if self.reduction_factor < 2:
            raise ConfigError(f"tune: reduction_factor must be >= 2, got {self.reduction_factor}.")
        if self.total_calls is not None and self.total_calls < 1:
            raise ConfigError(f"tune: total_calls must be >= 1, got {self.total_calls}.")
        if self.trial_cpus <= 0 or self.trial_gpus < 0:
            raise ConfigError(f"tune: trial_cpus must be > 0 and trial_gpus >= 0, got {self.trial_cpus}, {self.trial_gpus}.")

    @property
    def config(self) -> GDFOConfig:
        return self._config

    @classmethod
    def load(cls, storage_dir: str, name: str) -> "TuneSettings":
        """The settings a sweep was started with (``sweep.yaml``), so that a resume needs only its name."""
        path = os.path.join(os.path.abspath(storage_dir), name, "sweep.yaml")
        if not os.path.exists(path):
            raise GDFOError(f"Nothing to resume: {path} does not exist. Check --storage and --name.")
        with open(path) as f:
            saved = load_yaml(f)
        return cls(storage_dir=storage_dir, name=name, **saved)

    @property
    def experiment_dir(self) -> str:
        return os.path.join(self.storage_dir, self.name)


def trial_bundles(config: GDFOConfig, trial_cpus: float, trial_gpus: float) -> list[dict]:
    """The placement group of one trial: the trial itself, then one bundle per actor it starts."""
    if config.pool.backend == "local":
        return [{"CPU": trial_cpus, **({"GPU": trial_gpus} if trial_gpus else {})}]
    from gdfo_ray.distributed import actor_bundles

    bundles = [{"CPU": min(trial_cpus, 1.0)}] + actor_bundles(config)
    return [b or {"CPU": 0.01} for b in bundles]


def run_trial(params: dict, *, base: dict, budget: Any = None, limiter: Any = None, token: Optional[str] = None) -> None:
    """One trial: the driver on the train batch, reporting the best dev score every generation."""
    from ray import tune

    from gdfo_ray.api import open_run
    from gdfo_ray.driver import Driver
    from gdfo_ray.tasks import load_task

    trial_dir = tune.get_context().get_trial_dir()
    # Every generation scores its best prompt on dev (an unchanged prompt costs no call): ASHA's signal.
    overrides = {**params, "search.eval_every_calls": 1, "output_dir": trial_dir}
    config = GDFOConfig.from_dict(apply_overrides(copy.deepcopy(base), overrides))
    data = load_task(config.task, config.seed)
    checkpoint = None
    saved_trial = tune.get_checkpoint()
    if saved_trial is not None:
        with saved_trial.as_directory() as folder, open(os.path.join(folder, "state.pkl"), "rb") as f:
            checkpoint = pickle.load(f)

    def report(driver: Driver, row: dict) -> None:
        s = driver.state
        metrics = {METRIC: float(s.best_dev[1]), TIME_ATTR: int(s.budget.spent), "dev_calls": s.budget.dev_calls,
                   "generation": s.generation, "fitness_best": float(s.best_train[1]),
                   "current_dev_score": float(row.get("dev_score", float("nan")))}
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, "state.pkl"), "wb") as f:
                pickle.dump({"state": s, "student": driver.student_checkpoint()}, f)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    from gdfo_ray.distributed import budget_reservation

    reserve = budget_reservation(budget) if budget is not None else None
    with open_run(config, data, checkpoint=checkpoint, hooks=(report,), reserve_calls=reserve, limiter_actor=limiter,
                  token=token) as driver:
        driver.run()


def _trainable(settings: TuneSettings, budget: Any, limiter: Any):
    from ray import tune

    config = settings.config
    # The service's token is read here, where the user set it, and travels to the trials (never into a file).
    token = config.service_token() if config.model.teacher_is_service else None
    trainable = tune.with_parameters(run_trial, base=dict(settings.base), budget=budget, limiter=limiter, token=token)
    bundles = trial_bundles(settings.config, settings.trial_cpus, settings.trial_gpus)
    return tune.with_resources(trainable, tune.PlacementGroupFactory(bundles))


def _shared_actors(settings: TuneSettings):
    """The sweep's budget actor, and its rate limiter when the trials query one service with a limit."""
    from gdfo_ray.distributed import make_limiter, make_shared_budget

    os.makedirs(settings.experiment_dir, exist_ok=True)
    budget = make_shared_budget(settings.total_calls, os.path.join(settings.experiment_dir, "shared_budget.json"))
    p, limiter = settings.config.pool, None
    if settings.config.model.teacher_is_service and p.limited:
        limiter = make_limiter(p)
    return budget, limiter


def _check_fits(settings: TuneSettings) -> None:
    """Refuse a trial larger than the cluster: Tune would wait for it forever."""
    from gdfo_ray.distributed import shortfall

    need, have, short = shortfall(trial_bundles(settings.config, settings.trial_cpus, settings.trial_gpus))
    if short:
        raise ConfigError(
            f"tune: one trial needs {need}, but the cluster has {have}. "
            "Lower --trial-cpus (pool.backend=local) or the actors' resources (pool.*_num_cpus, n_*), or add nodes."
        )


@dataclass
class TuneResult:
    experiment_dir: str
    best_params: dict
    best_dev_score: float
    best_config_path: str
    trials_path: str


def tune_run(settings: TuneSettings, resume: bool = False, say: Callable[[str], None] = print) -> TuneResult:
    """Run (or, with ``resume``, continue) the sweep; writes the trials table and the best config."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from gdfo_ray.distributed import ray_session

    with ray_session(settings.config.pool.ray_address):
        _check_fits(settings)
        budget, limiter = _shared_actors(settings)
        trainable = _trainable(settings, budget, limiter)
        exists = tune.Tuner.can_restore(settings.experiment_dir)
        if resume:
            if not exists:
                raise GDFOError(f"Nothing to resume in {settings.experiment_dir}: no Tune experiment there.")
            say(f"[tune] resuming {settings.experiment_dir}")
            tuner = tune.Tuner.restore(settings.experiment_dir, trainable=trainable, resume_errored=True)
        else:
            if exists:
                raise GDFOError(f"{settings.experiment_dir} already holds a sweep. Either pass --resume to continue "
                                "it, or choose another --name.")
            budget_calls = settings.config.search.budget_calls
            grace = settings.grace_calls or max(1, budget_calls // 4)
            first = base_point(settings.space, settings.base)
            say("[tune] first trial: the base config's own values" if first else
                "[tune] the base config's values lie outside the space; no trial runs them")
            searcher = OptunaSearch(metric=METRIC, mode="max", seed=settings.seed,
                                    points_to_evaluate=[first] if first else None)
            if settings.max_concurrent:
                searcher = ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent)
            scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=budget_calls, grace_period=min(grace, budget_calls),
                                      reduction_factor=settings.reduction_factor)
            tuner = tune.Tuner(
                trainable, param_space=_tune_space(settings.space),
                tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=searcher, scheduler=scheduler,
                                            num_samples=settings.num_samples,
                                            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
                run_config=tune.RunConfig(name=settings.name, storage_path=settings.storage_dir, verbose=1,
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                          failure_config=tune.FailureConfig(max_failures=1)),
            )
            _write_settings(settings)
        grid = tuner.fit()
        return _summarize(settings, grid, say)


def _write_settings(settings: TuneSettings) -> None:
    import yaml

    os.makedirs(settings.experiment_dir, exist_ok=True)
    data = {k: getattr(settings, k) for k in ("num_samples", "max_concurrent", "grace_calls", "reduction_factor",
                                              "total_calls", "trial_cpus", "trial_gpus", "seed")}
    with open(os.path.join(settings.experiment_dir, "sweep.yaml"), "w") as f:
        yaml.safe_dump({**data, "space": dict(settings.space), "base": dict(settings.base)}, f, sort_keys=False)


def _summarize(settings: TuneSettings, grid, say: Callable[[str], None]) -> TuneResult:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    rows = []
    for result in grid:
        metrics = result.metrics or {}
        params = {k: v for k, v in (result.config or {}).items()}
        rows.append({
            # FINISHED: spent its budget; STOPPED: by ASHA or the sweep's shared budget.
            "trial_id": metrics.get("trial_id"),
            "status": "ERROR" if result.error else ("FINISHED" if metrics.get("done") else "STOPPED"),
            METRIC: metrics.get(METRIC), TIME_ATTR: metrics.get(TIME_ATTR), "dev_calls": metrics.get("dev_calls"),
            "generation": metrics.get("generation"), "error": None if result.error is None else str(result.error),
            "params_json": json.dumps(params), **{f"param:{k}": v for k, v in params.items()},
        })
    trials_path = os.path.join(settings.experiment_dir, "trials.parquet")
    pq.write_table(pa.Table.from_pylist(rows), trials_path)
    ok = [r for r in rows if r[METRIC] is not None and r["error"] is None]
    if not ok:
        raise GDFOError(f"No trial of {settings.experiment_dir} reported a dev score; see the trials' errors in "
                        f"{trials_path}.")
    # Ties (a small dev set has few distinct scores) go to the cheaper trial, then to the first trial id.
    best = min(ok, key=lambda r: (-r[METRIC], r[TIME_ATTR] or 0, str(r["trial_id"])))
    params = json.loads(best["params_json"])
    config = GDFOConfig.from_dict(apply_overrides(copy.deepcopy(dict(settings.base)), params)).to_dict()
    config["output_dir"] = None
    best_path = os.path.join(settings.experiment_dir, "best_config.yaml")
    with open(best_path, "w") as f:
        f.write(f"# Best of {len(rows)} trials by dev {settings.config.task.name} score {best[METRIC]:.4f} "
                f"(trial {best['trial_id']}); run it with: gdfo run --config {best_path}\n")
        yaml.safe_dump(config, f, sort_keys=False)
    say(f"[tune] best dev score {best[METRIC]:.4f} with {params}")
    say(f"[tune] trials: {trials_path}; best config: {best_path}")
    return TuneResult(settings.experiment_dir, params, float(best[METRIC]), best_path, trials_path)
