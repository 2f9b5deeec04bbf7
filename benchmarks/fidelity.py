"""Student fidelity and student cost, per task and per student setting, on recorded teacher answers.

Fidelity is what gdfo's gradient rests on: the Spearman correlation between the
fitness the student predicts for a population and the fitness the teacher then
returns, measured before the student has seen that population (as in a run).

Step 1 records a CMA-ES trajectory against the teacher (bbt's search, popsize
lambda, ``--calls`` calls) once per task and seed, and caches it as ``.npz``. Step 2
replays it for each student setting: per generation the student predicts the
population, is scored against the teacher's fitness, then gets the answers and
takes its K distillation steps, exactly the calls a gdfo run makes. It prints the
median fidelity per task and setting, and where a generation's student time goes
(predicting the population, K steps, the gradient) beside the teacher's time for
the same generation. Example::

    GDFO_DATA_DIR=../shared/data python benchmarks/fidelity.py --tasks sst2 ag_news rte \\
        --variant default --variant rank=student.rank_weight=1

A variant may also set ``projection=teacher`` (not a config key): the student's projection
then starts as the teacher's prompt space mapped into the student's embeddings
(:func:`aligned_projection`) instead of at random. ``warmup=N`` first trains the student for N
steps on the teacher's answers to one more prompt, before the first generation (:func:`warm_start`):
the manual prompt (``warm_prompt=manual``, the default: the template alone, no prompt tokens) or the
search's start (``warm_prompt=start``: z = 0). That costs a run one call.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import sys
import time
import zlib
from typing import Optional

import numpy as np
import torch

from gdfo_ray import GDFOConfig
from gdfo_ray.config import apply_overrides
from gdfo_ray.losses import fitness, kd_loss, spearman
from gdfo_ray.models import host_tensor
from gdfo_ray.student import ReplayBuffer, StudentTrainer
from gdfo_ray.tasks import load_task


def parse_variant(text: str) -> tuple[str, dict]:
    """``name=key=value,key=value`` (or just ``name``) -> (name, overrides)."""
    name, _, rest = text.partition("=")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def trajectory_path(config: GDFOConfig, calls: int, cache: str) -> str:
    """The cache file of a recorded trajectory: it depends on the teacher, the task and the search."""
    key = zlib.crc32(json.dumps([str(config.model), str(config.task), str(config.search),
                                 str(config.prompt)]).encode())
    return os.path.join(cache, f"{config.task.name}_{config.seed}_{calls}_{key:08x}.npz")


def teacher_and_space(config: GDFOConfig):
    """The task, the teacher and bbt's prompt space of a recording: a retest must project z the same way."""
    from gdfo_ray.local_teacher import LocalTeacher
    from gdfo_ray.prompt import make_space

    data = load_task(config.task, config.seed)
    teacher = LocalTeacher(config, data)
    return data, teacher, make_space("bbt", config.prompt, config.seed, teacher.describe(), teacher.embed_tokens)


def record(config: GDFOConfig, calls: int, path: str) -> dict:
    """The teacher's answers along one CMA-ES trajectory (cached: the teacher is the slow part)."""
    if os.path.exists(path):
        return dict(np.load(path))
    from gdfo_ray.methods import make_es

    data, teacher, space = teacher_and_space(config)
    es = make_es(config, config.seed + 1)
    ids = np.arange(len(data.train))
    Zs, logits_all, teacher_s = [], [], []
    loss = config.search.loss or data.spec.loss
    for _ in range(calls // config.popsize):
        Z = np.asarray(es.ask())
        t0 = time.perf_counter()
        logits = teacher.query(space.project(Z), "train", ids)
        teacher_s.append(time.perf_counter() - t0)
        es.tell(list(Z), fitness(logits, data.train.label, loss).tolist())
        Zs.append(Z)
        logits_all.append(logits)
    out = {"Z": np.stack(Zs), "logits": np.stack(logits_all), "teacher_s": np.asarray(teacher_s)}
    np.savez(path, **out)
    return out


def retest(config: GDFOConfig, traj: dict, generations: int) -> dict[str, np.ndarray]:
    """Spearman of recorded populations' fitness with the same prompts asked again: a ceiling on fidelity.

    The teacher is asked again with the candidates in reverse order (other batches, other
    padding: the noise of its batched arithmetic) and in float32 (the rounding of its
    dtype). No model of the teacher can order a population better than the teacher agrees
    with itself. The last ``generations`` generations are asked, where the search has moved.
    """
    from gdfo_ray.local_teacher import LocalTeacher

    data, teacher, space = teacher_and_space(config)
    labels, loss = data.train.label, config.search.loss or data.spec.loss
    ids = np.arange(len(data.train))
    f32 = GDFOConfig.from_dict(apply_overrides(config.to_dict(), {"model.dtype": "float32"}))
    teacher32 = LocalTeacher(f32, data)
    out: dict[str, list] = {"reversed": [], "float32": []}
    for Z, logits in zip(traj["Z"][-generations:], traj["logits"][-generations:]):
        recorded = fitness(logits, labels, loss)
        prompts = space.project(Z)
        again = teacher.query(prompts[::-1], "train", ids)[::-1]
        out["reversed"].append(spearman(recorded, fitness(again, labels, loss)))
        out["float32"].append(spearman(recorded, fitness(teacher32.query(prompts, "train", ids), labels, loss)))
    return {k: np.asarray(v) for k, v in out.items()}


@functools.lru_cache(maxsize=None)  # the same for every task and seed: load the two models and fit once
def embedding_map(teacher: str, student: str, ridge: float = 1.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """A linear map (W, b) from the teacher's token embeddings to the student's, and its fit.

    Fitted by ridge regression on the words both vocabularies hold (a byte-level BPE word
    ``Ġword`` to WordPiece ``word``, a BPE piece to ``##piece``), on 80% of them; the fit
    reports R^2 and how often the mapped embedding's nearest student word is the right one,
    on the other 20%.
    """
    from gdfo_ray.models import load_lm

    t_tok, t_model, _ = load_lm(teacher, need_lm_head=False)
    s_tok, s_model, _ = load_lm(student, need_lm_head=False)
    s_vocab, pairs = s_tok.get_vocab(), []
    for token, i in sorted(t_tok.get_vocab().items(), key=lambda item: item[1]):  # a dict in no fixed order
        word, target = (token[1:], token[1:].lower()) if token.startswith("Ġ") else (token, "##" + token.lower())
        if len(word) >= 2 and word.isalpha() and target in s_vocab:
            pairs.append((i, s_vocab[target]))
    if len(pairs) < 1000:
        raise ValueError(f"Only {len(pairs)} words are shared by the vocabularies of {teacher!r} and {student!r}; "
                         "the map needs a BPE teacher and a WordPiece student with many shared words.")
    with torch.no_grad():
        ET = t_model.get_input_embeddings().weight[[t for t, _ in pairs]].double().numpy()
        ES = s_model.get_input_embeddings().weight[[s for _, s in pairs]].double().numpy()
    held = np.random.default_rng(0).permutation(len(pairs))
    fit, test = held[: int(0.8 * len(pairs))], held[int(0.8 * len(pairs)):]
    X = np.hstack([ET, np.ones((len(ET), 1))])
    Wb = np.linalg.solve(X[fit].T @ X[fit] + ridge * np.eye(X.shape[1]), X[fit].T @ ES[fit])
    pred = X[test] @ Wb
    r2 = 1 - ((pred - ES[test]) ** 2).sum() / ((ES[test] - ES[test].mean(0)) ** 2).sum()
    unit = ES / np.linalg.norm(ES, axis=1, keepdims=True)
    nearest = (pred / np.linalg.norm(pred, axis=1, keepdims=True) @ unit.T).argmax(1)
    return Wb[:-1], Wb[-1], {"words": len(pairs), "r2": float(r2), "nearest": float((nearest == test).mean())}


def aligned_projection(config: GDFOConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """The student's (A_S, P0_S) as the teacher's prompt space seen through :func:`embedding_map`.

    Each of the teacher's prompt tokens P0_T + A_T z is mapped to the student's embeddings,
    so the student starts out reading, token by token, the prompt the teacher reads.
    """
    _, _, space = teacher_and_space(config)
    W, b, fit = embedding_map(config.model.teacher, config.model.student)
    d, n = config.prompt.intrinsic_dim, config.prompt.n_prompt_tokens
    return (space.A.reshape(d, n, -1) @ W).reshape(d, -1), space.P0 @ W + b, fit


WARM_PROMPTS = ("manual", "start")


def warm_answers(config: GDFOConfig, prompt: str) -> np.ndarray:
    """The teacher's logits (rows, C) on the train set for the manual prompt (no tokens) or z = 0."""
    data, teacher, space = teacher_and_space(config)
    prompts = (np.zeros((1, 0, space.spec.hidden_size), np.float32) if prompt == "manual"
               else space.project(np.zeros((1, config.prompt.intrinsic_dim))))
    return np.asarray(teacher.query(prompts, "train", np.arange(len(data.train))))[0]


def warm_start(trainer: StudentTrainer, buffer: ReplayBuffer, answers: np.ndarray, prompt: str, steps: int,
               rng: np.random.Generator, labels: np.ndarray, loss: str) -> float:
    """``steps`` distillation steps on the teacher's answers to one prompt, before the first generation.

    With the manual prompt the student too reads the template alone: only its head can learn
    from it, the teacher's leaning on each example before any prompt moves it. With the
    search's start both read their prompt at z = 0, which joins the replay buffer as a run's
    paid answers would. Returns the last step's KD loss.
    """
    cfg, n = trainer.config, len(labels)
    last = float("nan")
    if prompt == "start":
        Z = np.zeros((1, trainer.model.A.shape[0]))
        buffer.add(Z, answers[None], np.arange(n), fitness(answers[None], labels, loss))
        for _ in range(steps):
            last = trainer.train_steps([buffer.sample(cfg.batch_rows, rng, labels, 0)])
        return last
    for _ in range(steps):
        rows = rng.choice(n, min(cfg.batch_rows, n), replace=False)
        trainer.optimizer.zero_grad(set_to_none=True)
        empty = torch.zeros(len(rows), 0, trainer.model.h, device=trainer.device)
        out = kd_loss(trainer.model.lm(empty, rows, "train").float(), host_tensor(answers[rows], trainer.device),
                      host_tensor(labels[rows], trainer.device), cfg.tau, cfg.beta)
        out.backward()
        trainer.optimizer.step()
        last = out.item()
    return last


def replay(config: GDFOConfig, traj: dict, projection: Optional[tuple] = None,
           warm: Optional[tuple[str, int, np.ndarray]] = None) -> dict:
    """Fidelity per generation and the student's time per part, as a gdfo run would spend it.

    ``projection`` (A_S, P0_S) replaces the student's random projection at the start;
    ``warm`` (prompt, steps, the teacher's answers) trains the student first (:func:`warm_start`).
    """
    data = load_task(config.task, config.seed)
    trainer = StudentTrainer(config, data)
    if projection is not None:
        with torch.no_grad():
            for param, value in zip((trainer.model.A, trainer.model.P0), projection):
                param.copy_(torch.as_tensor(value, dtype=param.dtype).reshape(param.shape))
    buffer = ReplayBuffer(config.student.buffer_candidates)
    rng = np.random.default_rng(config.seed)
    loss = config.search.loss or data.spec.loss
    labels, ids = data.train.label, np.arange(len(data.train))
    cfg = config.student
    pop_rows = min(8, len(ids)) if cfg.rank_weight > 0 else 0
    # The rows a run compares the student and the teacher on (see Driver.fidelity_rows).
    fid_rows = np.sort(np.random.default_rng(config.seed + 7).choice(len(ids), min(cfg.fidelity_rows, len(ids)),
                                                                      replace=False))
    warm_loss = float("nan")
    if warm is not None:
        prompt, steps, answers = warm
        warm_loss = warm_start(trainer, buffer, answers, prompt, steps, rng, labels, loss)
    fid, t_pred, t_train, t_grad = [], [], [], []
    for Z, logits in zip(traj["Z"], traj["logits"]):
        F = fitness(logits, labels, loss)
        t0 = time.perf_counter()
        fid.append(spearman(trainer.predict_fitness(Z, fid_rows), fitness(logits[:, fid_rows], labels[fid_rows], loss)))
        t1 = time.perf_counter()
        buffer.add(Z, logits, ids, F)
        trainer.train_steps([buffer.sample(cfg.batch_rows, rng, labels, pop_rows) for _ in range(cfg.k_steps)])
        t2 = time.perf_counter()
        trainer.grad_z(Z.mean(0))
        t3 = time.perf_counter()
        t_pred.append(t1 - t0)
        t_train.append(t2 - t1)
        t_grad.append(t3 - t2)
    return {"fidelity": np.asarray(fid), "predict_s": np.asarray(t_pred), "train_s": np.asarray(t_train),
            "grad_s": np.asarray(t_grad), "warm_kd_loss": warm_loss}


def linear_surrogate(traj: dict, labels: np.ndarray, loss: str, ridge: float = 1.0) -> np.ndarray:
    """Fidelity of a ridge regression of fitness on z over all earlier candidates (no student at all).

    It says how much of a population's order a model linear in z can know from the answers
    already paid for: the bar a student has to clear.
    """
    fid, Zs, Fs = [], [], []
    for Z, logits in zip(traj["Z"], traj["logits"]):
        F = fitness(logits, labels, loss)
        if Zs:
            X, y = np.vstack(Zs), np.concatenate(Fs)
            mu, ym = X.mean(0), y.mean()
            Xc = X - mu
            w = np.linalg.solve(Xc.T @ Xc + ridge * np.eye(X.shape[1]), Xc.T @ (y - ym))
            fid.append(spearman((Z - mu) @ w, F))
        else:
            fid.append(float("nan"))
        Zs.append(Z)
        Fs.append(F)
    return np.asarray(fid)


def search_progress(traj: dict, labels: np.ndarray, loss: str) -> str:
    """The recorded search itself: how wide its populations are and how far it got on the train batch.

    Fidelity depends on the step size; this says what a smaller step costs the search.
    """
    radius = [float(np.linalg.norm(Z - Z.mean(0), axis=1).mean()) for Z in traj["Z"]]
    best_loss = min(float(fitness(logits, labels, loss).min()) for logits in traj["logits"])
    best_acc = max(float((logits.argmax(-1) == labels).mean(axis=1).max()) for logits in traj["logits"])
    return (f"population radius in z {radius[0]:.1f} -> {radius[-1]:.1f}; best train loss {best_loss:.3f}, "
            f"best train accuracy {best_acc:.0%} after {sum(len(Z) for Z in traj['Z'])} calls")


def calibration_order(traj: dict, labels: np.ndarray, loss: str) -> np.ndarray:
    """Per generation: Spearman of fitness against how far the population's mean logits lean to one class.

    The lean of a candidate is the spread (std over classes) of its logits averaged over the
    batch. When this is near 1, a population's order is mostly how well the prompt
    calibrates the classes, not how well it separates the examples.
    """
    out = []
    for logits in traj["logits"]:
        lean = logits.mean(axis=1).std(axis=-1)
        out.append(spearman(fitness(logits, labels, loss), lean))
    return np.asarray(out)


def forecast_fidelity(traj: dict, labels: np.ndarray, loss: str, predict, hindsight: bool = False) -> np.ndarray:
    """Per generation: how well a model fitted to all earlier answers orders the next population.

    ``predict(X, L, Z)`` gets the earlier candidates ``X`` (n, d) and their logits ``L``
    (n, B, C), in the order they were asked, and returns its logits for the population ``Z``.
    With ``hindsight`` the model gets every other generation, later ones too: more answers
    than any run has, on both sides of the population. Not a forecast: it tells how much of
    the ranking the answers hold at all, apart from having to extrapolate ahead of the search.
    """
    fid = [float("nan")]
    for t in range(1, len(traj["Z"])):
        seen = [s for s in range(len(traj["Z"])) if s != t] if hindsight else list(range(t))
        X = np.vstack([traj["Z"][s] for s in seen])
        L, Z = np.concatenate([traj["logits"][s] for s in seen]), traj["Z"][t]
        fid.append(spearman(fitness(predict(X, L, Z), labels, loss), fitness(traj["logits"][t], labels, loss)))
    return np.asarray(fid)


def shift_surrogate(traj: dict, labels: np.ndarray, loss: str, ridge: float = 10.0) -> np.ndarray:
    """Fidelity of a model of the class shift linear in z (ridge on all earlier candidates).

    It predicts each candidate's mean logits from z, adds them to the last population's
    per-example logits (centred), and scores the result: the best case for a student
    whose response to z is one class shift shared by all examples (``student.z_shift``).
    """
    def predict(X: np.ndarray, L: np.ndarray, Z: np.ndarray) -> np.ndarray:
        shift = L.mean(axis=1)
        mu, sm = X.mean(0), shift.mean(0)
        W = np.linalg.solve((X - mu).T @ (X - mu) + ridge * np.eye(X.shape[1]), (X - mu).T @ (shift - sm))
        last = L[-len(Z):]  # the previous population: every population has the same size
        base = last.mean(0) - last.mean(axis=(0, 1))
        return base[None] + ((Z - mu) @ W + sm)[:, None, :]

    return forecast_fidelity(traj, labels, loss, predict)


def example_surrogate(traj: dict, labels: np.ndarray, loss: str, ridge: float = 100.0,
                      hindsight: bool = False) -> np.ndarray:
    """Fidelity of one linear model of z per train example and class (ridge on all earlier candidates).

    The richest model linear in z that the paid answers can fit: B x C x d weights, the
    first-order Taylor model of the teacher on the train batch.
    """
    def predict(X: np.ndarray, L: np.ndarray, Z: np.ndarray) -> np.ndarray:
        mu, Lm = X.mean(0), L.mean(0)
        W = np.linalg.solve((X - mu).T @ (X - mu) + ridge * np.eye(X.shape[1]),
                            (X - mu).T @ (L - Lm).reshape(len(X), -1))
        return (Lm.reshape(-1) + (Z - mu) @ W).reshape(len(Z), *Lm.shape)

    return forecast_fidelity(traj, labels, loss, predict, hindsight)


def gp_surrogate(traj: dict, labels: np.ndarray, loss: str, scale: float = 0.5,
                 nugget: float = 1e-2, hindsight: bool = False) -> np.ndarray:
    """Fidelity of a Gaussian process on the per-example logits (RBF kernel, all earlier candidates).

    A nonparametric bar beside the linear ones: it can bend with the teacher's response. How
    well it ranks depends on ``scale`` and ``nugget`` (:func:`best_of_grid`). The length scale
    is ``scale`` times the median distance between the earlier candidates.
    """
    def predict(X: np.ndarray, L: np.ndarray, Z: np.ndarray) -> np.ndarray:
        d2 = ((X[:, None] - X[None]) ** 2).sum(-1)
        ell2 = (scale * np.median(np.sqrt(d2[np.triu_indices(len(X), 1)]))) ** 2
        K = np.exp(-d2 / (2 * ell2)) + nugget * np.eye(len(X))
        k = np.exp(-((Z[:, None] - X[None]) ** 2).sum(-1) / (2 * ell2))
        Lm = L.mean(0).reshape(-1)
        return (Lm + k @ np.linalg.solve(K, L.reshape(len(X), -1) - Lm)).reshape(len(Z), *L.shape[1:])

    return forecast_fidelity(traj, labels, loss, predict, hindsight)


SURROGATE_GRID = (
    [(f"Gaussian process, length scale {scale:g} x median distance, nugget {nugget:g}",
      functools.partial(gp_surrogate, scale=scale, nugget=nugget))
     for scale in (0.125, 0.25, 0.5, 1.0, 2.0) for nugget in (1e-2, 1.0)]
    + [(f"per-example logits linear in z, ridge {ridge:g}", functools.partial(example_surrogate, ridge=ridge))
       for ridge in (1.0, 1e2, 1e4, 1e6)]
)


def best_of_grid(traj: dict, labels: np.ndarray, loss: str, hindsight: bool,
                 skip_first: int) -> tuple[str, np.ndarray]:
    """The model of :data:`SURROGATE_GRID` with the highest median fidelity on this run.

    Picked with the answers it is scored on, so it flatters: a ceiling on what these models can
    rank, not a setting to use.
    """
    scored = []
    for name, surrogate in SURROGATE_GRID:
        fid = surrogate(traj, labels, loss, hindsight=hindsight)
        tail = fid[skip_first:]
        scored.append((np.median(tail[np.isfinite(tail)]) if np.isfinite(tail).any() else -np.inf, name, fid))
    _, name, fid = max(scored, key=lambda s: s[0])
    return name, fid


def summarize(fid: np.ndarray) -> str:
    """Two table cells: the median fidelity and the share of generations above 0.

    A generation whose predictions are all equal has no Spearman (NaN); it is left out, and a
    setting with none left says so instead of printing NaN.
    """
    f = fid[np.isfinite(fid)]
    if not len(f):
        return "n/a (constant predictions) | –"
    return f"{np.median(f):+.3f} | {np.mean(f > 0):.0%}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["sst2", "ag_news", "rte"])
    p.add_argument("--seeds", nargs="+", type=int, default=[42])
    p.add_argument("--calls", type=int, default=255, help="teacher calls recorded per task and seed")
    p.add_argument("--variant", action="append", default=None,
                   help="name=key=value,key=value (student settings to compare; projection=teacher starts the "
                        "student's projection from the teacher's prompt space; warmup=N and warm_prompt=manual|start "
                        "train it first on the teacher's answers to one more prompt); repeatable")
    p.add_argument("--set", action="append", default=[], help="key=value applied to every run")
    p.add_argument("--cache", default="runs/fidelity_cache")
    p.add_argument("--surrogates-only", action="store_true",
                   help="only the rows that need no student (from the cached teacher answers)")
    p.add_argument("--retest", type=int, default=0, metavar="G",
                   help="ask the teacher again for the last G recorded generations (reversed order, float32): "
                        "how well the teacher's fitness agrees with itself")
    p.add_argument("--skip-first", type=int, default=2,
                   help="generations left out of the median (the untrained student's first guesses)")
    args = p.parse_args(argv)
    variants = [] if args.surrogates_only else [parse_variant(v) for v in (args.variant or ["default"])]
    for name, overrides in variants:  # before any teacher call: a recording takes minutes
        if overrides.get("projection", "random") not in ("random", "teacher"):
            p.error(f"variant {name!r}: projection must be 'random' or 'teacher', not {overrides['projection']!r}")
        if overrides.get("warm_prompt", "manual") not in WARM_PROMPTS:
            p.error(f"variant {name!r}: warm_prompt must be one of {WARM_PROMPTS}, not {overrides['warm_prompt']!r}")
        warmup = overrides.get("warmup", 0)
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            p.error(f"variant {name!r}: warmup must be a whole number of steps >= 0, not {warmup!r}")
        if "warm_prompt" in overrides and not warmup:
            p.error(f"variant {name!r}: warm_prompt needs warmup=N (steps > 0) to have an effect")
    common = dict(parse_variant("x=" + ",".join(args.set))[1]) if args.set else {}
    os.makedirs(args.cache, exist_ok=True)
    print("| task | seed | setting | median fidelity | fidelity > 0 | teacher s/gen | student s/gen "
          "(predict + K steps + gradient) |")
    print("|---|---|---|---|---|---|---|")
    for task in args.tasks:
        for seed in args.seeds:
            base = apply_overrides(GDFOConfig().to_dict(), {"task.name": task, "task.prompt_placement": "suffix",
                                                            "seed": seed, "method": "gdfo", **common})
            config = GDFOConfig.from_dict(base)
            traj = record(config, args.calls, trajectory_path(config, args.calls, args.cache))
            teacher_s = float(np.median(traj["teacher_s"]))
            data = load_task(config.task, config.seed)
            labels, loss = data.train.label, config.search.loss or data.spec.loss
            surrogates = [("ridge regression on z", linear_surrogate(traj, labels, loss)),
                          ("class shift linear in z", shift_surrogate(traj, labels, loss)),
                          ("per-example logits linear in z", example_surrogate(traj, labels, loss))]
            surrogates += [(f"Gaussian process on per-example logits, length scale {scale:g} x median distance",
                            gp_surrogate(traj, labels, loss, scale)) for scale in (1.0, 0.5)]
            for hindsight in (False, True):
                name, f = best_of_grid(traj, labels, loss, hindsight, args.skip_first)
                when = "in hindsight, fitted to every other generation" if hindsight else "forecast"
                surrogates.append((f"best of {len(SURROGATE_GRID)} models, picked after the fact, {when}: {name}", f))
            for name, f in surrogates:
                print(f"| {task} | {seed} | ({name}, no student) | {summarize(f[args.skip_first:])} | "
                      f"{teacher_s:.2f} | – |", flush=True)
            print(f"| {task} | {seed} | (the search: {search_progress(traj, labels, loss)}) "
                  "| | | | |", flush=True)
            c = calibration_order(traj, labels, loss)
            half = len(c) // 2
            print(f"| {task} | {seed} | (order explained by calibration: fitness vs class lean, first / second "
                  f"half of the generations) | {np.median(c[:half]):+.2f} / {np.median(c[half:]):+.2f} | | | |",
                  flush=True)
            if args.retest:
                for how, f in retest(config, traj, args.retest).items():
                    print(f"| {task} | {seed} | (the teacher against itself, asked again {how}, last "
                          f"{args.retest} generations) | {summarize(f)} | {teacher_s:.2f} | – |", flush=True)
            for name, overrides in variants:
                overrides = dict(overrides)
                projection = overrides.pop("projection", "random")
                warm_prompt, warmup = overrides.pop("warm_prompt", "manual"), overrides.pop("warmup", 0)
                vconfig = GDFOConfig.from_dict(apply_overrides(copy.deepcopy(base), overrides))
                aligned = None
                if projection == "teacher":
                    A, P0, fit = aligned_projection(vconfig)
                    aligned = (A, P0)
                    print(f"| {task} | {seed} | ({name}: teacher-to-student embedding map fitted on {fit['words']} "
                          f"shared words, held-out R^2 {fit['r2']:.2f}, nearest word right {fit['nearest']:.0%}) "
                          "| | | | |", flush=True)
                warm = (warm_prompt, warmup, warm_answers(vconfig, warm_prompt)) if warmup else None
                r = replay(vconfig, traj, aligned, warm)
                if warm:
                    print(f"| {task} | {seed} | ({name}: {warmup} steps first on the teacher's answers to the "
                          f"{'manual prompt' if warm_prompt == 'manual' else 'start of the search (z = 0)'}, "
                          f"KD loss {r['warm_kd_loss']:.3f} at the last) | | | | |", flush=True)
                parts = [float(np.median(r[k])) for k in ("predict_s", "train_s", "grad_s")]
                print(f"| {task} | {seed} | {name} | {summarize(r['fidelity'][args.skip_first:])} | {teacher_s:.2f} "
                      f"| {sum(parts):.2f} ({parts[0]:.2f} + {parts[1]:.2f} + {parts[2]:.2f}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
