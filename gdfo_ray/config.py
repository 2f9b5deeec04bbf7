"""Typed run configuration, one frozen dataclass per role, validated on construction.

Only the standard library is used here, so a config can be built, checked and
written (YAML/JSON) on a machine without torch or Ray, e.g. by a campaign
planner. Defaults are the embedded defaults of ``make run``: GDFO on SST-2,
seed 42, SmolLM2-135M-Instruct as the black box, ``gp`` as the student (it needs nothing but
the paid answers, and it is the one black-box student with which gdfo beat bbt:
benchmarks/results/ladder-report), with a budget that fits a 2-core laptop in a few
minutes. The published BBT setting is ``intrinsic_dim=500, n_prompt_tokens=50, popsize=20, budget_calls=8000``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from gdfo_ray.exceptions import ConfigError, TeacherError

METHODS = ("manual", "bbt", "bbtv2", "kd", "gdfo", "white_box", "lq_cma")
LOSSES = ("ce", "hinge")
MODEL_KINDS = ("auto", "causal_lm", "masked_lm", "encoder")
BACKENDS = ("ray", "local")
CONTROLS = ("none", "random")
PROMPT_INITS = ("vocab", "zeros")
GATES = ("rho", "none", "off")  # harmonize.harmonize's gates
DTYPES = ("auto", "float32", "bfloat16", "float16")

DATA_DIR_ENV = "GDFO_DATA_DIR"
RECORDING_SUFFIX = ".npz"  # a file of recorded teacher answers (gdfo_ray.teachers.playback)


def run_label(method: str, control: str = "none") -> str:
    """How runs, campaign cells and reports name a method run with ``harmonize.control``: ``gdfo_random``
    for gdfo's random-direction control. The one place the label is formed (:func:`label_settings` reads it)."""
    return f"{method}_{control}" if method == "gdfo" and control != "none" else method


def label_settings(label: str) -> dict:
    """The settings a :func:`run_label` stands for: ``{"method": ..., "harmonize.control": ...}``."""
    for control in CONTROLS[1:]:
        if label == run_label("gdfo", control):
            return {"method": "gdfo", "harmonize.control": control}
    return {"method": label}


RUN_LABELS = METHODS + tuple(run_label("gdfo", c) for c in CONTROLS[1:])
# Students that are not a model id of their own (model.student): see StudentSpec.
STUDENT_KINDS = ("oracle", "oracle:S", "sibling:K", "gp", "<HF model id or local path>")


@dataclass(frozen=True)
class StudentSpec:
    """What ``model.student`` names, parsed once.

    ``oracle``: the teacher's own weights reading the teacher's own projection, frozen, so
    the gradient in z is exact (a diagnostic: it breaks the black-box premise). ``oracle:S``:
    the oracle's fitness plus a fixed random smooth function of z, scaled on each population
    it ranks to S times the oracle's own spread there, so that its ranking and gradient degrade
    together and stay so as the search narrows: a student of set faithfulness, to fill the
    ladder between the real students and the exact oracle (a diagnostic too). On CMA-ES's own
    populations it ranks a little under 1/sqrt(1 + S^2); in a gdfo run higher, as its gradient
    candidate descends the oracle and the noise together (benchmarks/oracle_noise.py).
    ``sibling:K``: the teacher's first K blocks, its final norm and head, reading the teacher's
    prompt embeddings and distilled like any student (an API model and a smaller open model
    of its family). ``gp``: a Gaussian process on the per-example logits of the paid answers.
    Anything else is a model id or path, distilled through its own projection.
    """

    kind: str  # "model", "oracle", "sibling" or "gp"
    name: str = ""  # the model id or path, for kind "model"
    layers: Optional[int] = None  # K, for kind "sibling"
    noise: float = 0.0  # S, for kind "oracle"

    @property
    def reads_teacher(self) -> bool:
        """Whether the student is built from the teacher's weights and reads its prompt space."""
        return self.kind in ("oracle", "sibling")

    @property
    def noisy(self) -> bool:
        """oracle:S with S > 0: its noise is rescaled on each population it ranks, so a prediction changes it."""
        return self.kind == "oracle" and self.noise > 0


def parse_student(name: str) -> StudentSpec:
    """``model.student`` as a :class:`StudentSpec`; a bad ``sibling:K`` fails naming the field."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model.student must be one of {list(STUDENT_KINDS)}, but got {name!r}.")
    if name in ("oracle", "gp"):
        return StudentSpec(name)
    if name.startswith("oracle:"):
        amplitude = name.partition(":")[2]
        try:
            noise = float(amplitude)
        except ValueError:
            noise = -1.0
        if not math.isfinite(noise) or noise < 0:
            raise ConfigError(f"model.student={name!r}: a noisy oracle is 'oracle:S' with S >= 0 the amplitude of "
                              "its noise in units of the oracle's own spread, e.g. 'oracle:1.5'.")
        return StudentSpec("oracle", noise=noise)
    if name.startswith("sibling"):
        _, sep, k = name.partition(":")
        if not sep or not k.isdigit() or int(k) < 1:
            raise ConfigError(f"model.student={name!r}: a sibling student is 'sibling:K' with K >= 1 the number of "
                              "the teacher's transformer blocks it keeps, e.g. 'sibling:12'.")
        return StudentSpec("sibling", layers=int(k))
    return StudentSpec("model", name=name)


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, but got {value!r}.")


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number {bound}, but got {value!r}.")


def check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, but got {value!r}.")


@dataclass(frozen=True)
class TaskConfig:
    """Which task, and where its data comes from.

    Args:
        name: a preset (``sst2``, ``yelp_polarity``, ``ag_news``, ``dbpedia``, ``mrpc``,
            ``snli``, ``rte``) or any other name for a custom task, which then needs
            ``labels``, ``verbalizer``, ``template`` and data files.
        data_dir: root of BBT-layout data (``<task>/16-shot/<seed>/{train,dev}.jsonl``,
            ``<task>/test.jsonl``). Defaults to ``$GDFO_DATA_DIR``; with neither, and no
            files, the task loads from the Hugging Face Hub.
        split_seed: which few-shot split to use; defaults to the run seed.
        train_file, dev_file, test_file: the user's own data (JSONL, CSV, TSV or Parquet).
        hf_dataset: a Hub dataset id (``name`` or ``name/config``) overriding the preset's.
        template: overrides the preset template; placeholders ``{prompt}``, ``{text}``,
            ``{text_pair}``, ``{mask}`` (the label slot; for causal LMs it must end the template).
        verbalizer: one word per class, each a single token in every model's tokenizer.
        labels: class names, index = integer label (needed for custom tasks).
        pair: whether examples are text pairs (custom tasks).
        metric: ``accuracy`` or ``f1`` (binary, positive class 1).
        shots: examples per class in train and in dev when sampling from the Hub.
        max_text_tokens: each text field is cut to this many tokens.
        max_text_chars: each text field is cut to this many characters when the data is
            loaded (None: not cut); for a service whose ``max_text_chars`` is below a task's
            longest text.
        max_test_examples: evaluate on a seeded subsample of the test set (None: all).
        prompt_placement: for causal-LM teachers, ``prefix`` keeps the template's
            ``{prompt}`` before the text (BBT); ``suffix`` moves it after the last text
            field, so the text's key/value states are computed once per run and reused
            by every call (``model.kv_cache``). Masked-LM templates are unchanged.
    """

    name: str = "sst2"
    data_dir: Optional[str] = None
    split_seed: Optional[int] = None
    train_file: Optional[str] = None
    dev_file: Optional[str] = None
    test_file: Optional[str] = None
    hf_dataset: Optional[str] = None
    template: Optional[str] = None
    verbalizer: Optional[tuple] = None
    labels: Optional[tuple] = None
    pair: Optional[bool] = None
    metric: Optional[str] = None
    shots: int = 16
    max_text_tokens: int = 128
    max_text_chars: Optional[int] = None
    max_test_examples: Optional[int] = None
    prompt_placement: str = "prefix"

    def __post_init__(self) -> None:
        check_choice("task.prompt_placement", self.prompt_placement, ("prefix", "suffix"))
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"task.name must be a non-empty string, but got {self.name!r}.")
        if self.metric is not None:
            check_choice("task.metric", self.metric, ("accuracy", "f1"))
        check_int("task.shots", self.shots, 1)
        check_int("task.max_text_tokens", self.max_text_tokens, 1)
        if self.max_text_chars is not None:
            check_int("task.max_text_chars", self.max_text_chars, 1)
        if self.max_test_examples is not None:
            check_int("task.max_test_examples", self.max_test_examples, 1)
        if (self.dev_file or self.test_file) and not self.train_file:
            raise ConfigError(
                "task.dev_file/test_file were given without task.train_file. "
                "Either pass all three files or none of them."
            )
        for name in ("verbalizer", "labels"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    def resolved_data_dir(self) -> Optional[str]:
        """The BBT-layout data root: the field, else ``$GDFO_DATA_DIR``, else None."""
        return self.data_dir or os.environ.get(DATA_DIR_ENV) or None


@dataclass(frozen=True)
class ModelConfig:
    """The black-box teacher and the local student.

    Args:
        teacher: HF model id or local path of the teacher (masked or causal LM), or the
            URL (``http://...``/``https://...``) of a black-box service (``gdfo serve``
            or any service speaking its API; see ``service``).
        student: HF model id or local path of the student (encoder, masked or causal LM), or
            ``oracle``, ``oracle:S``, ``sibling:K`` or ``gp`` (:class:`StudentSpec`). ``oracle`` and
            ``sibling:K`` load the teacher's weights, so they need a local teacher; they run in
            the teacher's ``dtype`` and ``max_rows_per_forward``, and cache the text before the
            prompt as the teacher does (``kv_cache``) unless ``student.train_body``.
        teacher_kind, student_kind: ``auto`` reads the model config.
        dtype: the teacher's weights and arithmetic (the student always trains in float32).
            ``auto`` takes bfloat16 where the processor multiplies it natively (a CPU with
            AMX or AVX512-BF16, a CUDA GPU that supports it), else float32. On this
            project's 2-core Xeon (AMX) that made a call 3.5x faster; class decisions agreed
            with float32 on 98 to 99% of rows (benchmarks/throughput.py). summary.json
            records the dtype used.
        device: ``auto`` (a GPU where the actor has one, else CPU), ``cpu`` or ``cuda[:i]``.
        max_rows_per_forward: population x examples rows in one forward. Small chunks keep
            the activations in cache: on a 2-core CPU, SmolLM2's call took 1.08 s at 64 rows
            against 1.86 s at 256 (benchmarks/throughput.py).
        max_tokens_per_forward: tokens of one forward, padding included (None: no limit):
            long rows go in smaller forwards, so padding stays a small share of the work.
            On a 2-core AMD EPYC in float32, 2048 made SmolLM2's call on RTE (long texts)
            about 20% faster than 64 rows alone, and left SST-2's (short ones) as it was
            (docs/performance.md). It changes the rounding, not the result.
        kv_cache: a causal-LM teacher reuses the states of tokens that do not see the text:
            with the prompt before the text (``prefix``), each prompt's states once per call,
            not once per example (SmolLM2 on SST-2: 29% less work a call); with the prompt
            after it (``suffix``), the text's states once per run, on train and dev. Off,
            every row runs whole, as a plain forward; the scores agree to about 1e-6.
        compile: ``torch.compile`` the teacher's transformer. It pays only in long runs:
            on a 2-core CPU the first call took 131 s, and each later one 17% less.
        record_answers: write every answer the teacher gives to this ``.npz`` file; a later run
            with ``teacher`` set to it plays them back (:mod:`gdfo_ray.teachers.playback`).
    """

    teacher: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    student: str = "gp"
    teacher_kind: str = "auto"
    student_kind: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    max_rows_per_forward: int = 64
    max_tokens_per_forward: Optional[int] = 2048
    kv_cache: bool = True
    compile: bool = False
    record_answers: Optional[str] = None

    def __post_init__(self) -> None:
        check_choice("model.teacher_kind", self.teacher_kind, MODEL_KINDS)
        check_choice("model.student_kind", self.student_kind, MODEL_KINDS)
        check_choice("model.dtype", self.dtype, DTYPES)
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"model.device must be 'auto', 'cpu' or 'cuda[:i]', but got {self.device!r}.")
        check_int("model.max_rows_per_forward", self.max_rows_per_forward, 1)
        if self.max_tokens_per_forward is not None:
            check_int("model.max_tokens_per_forward", self.max_tokens_per_forward, 1)
        spec = parse_student(self.student)
        if spec.reads_teacher and self.teacher_is_service:
            raise ConfigError(
                f"model.student={self.student!r} is built from the teacher's weights, but model.teacher="
                f"{self.teacher!r} is a black-box service. Either pass the teacher as a local model id or path, "
                "or choose a student model of your own (model.student=<id or path>) or 'gp'."
            )
        if spec.reads_teacher and self.teacher_is_recording:
            raise ConfigError(
                f"model.student={self.student!r} is built from the teacher's weights, but model.teacher="
                f"{self.teacher!r} is a recording of its answers. Replay it with a student model of your own "
                "or 'gp'."
            )
        if self.record_answers is not None and not self.record_answers.endswith(RECORDING_SUFFIX):
            raise ConfigError(f"model.record_answers must name a {RECORDING_SUFFIX} file, "
                              f"but got {self.record_answers!r}.")

    @property
    def student_spec(self) -> StudentSpec:
        return parse_student(self.student)

    @property
    def teacher_is_service(self) -> bool:
        return is_service_url(self.teacher)

    @property
    def teacher_is_recording(self) -> bool:
        return not self.teacher_is_service and self.teacher.endswith(RECORDING_SUFFIX)


def is_service_url(name: str) -> bool:
    return name.startswith(("http://", "https://"))


@dataclass(frozen=True)
class PromptConfig:
    """The intrinsic space: P(z) = P0 + A z (docs/method.md, Objects).

    Args:
        intrinsic_dim: d, the dimension of z.
        n_prompt_tokens: n, the number of prompt embeddings prepended at ``{prompt}``.
        alpha: scale of A's std relative to std(word embeddings) / sqrt(d).
        init: P0 from n random vocabulary tokens (``vocab``, BBT) or ``zeros``.
        deep_layers: for ``bbtv2``, how many layers get a prompt, counted from the input:
            layer 0 is the input embeddings (as in BBT), layer l >= 1 adds its prompt to the
            hidden states entering transformer layer l. None: every layer. Each layer
            has its own z (d each) and its own CMA-ES, so a small budget is better spent
            on fewer layers.
    """

    intrinsic_dim: int = 100
    n_prompt_tokens: int = 10
    alpha: float = 1.0
    init: str = "vocab"
    deep_layers: Optional[int] = None

    def __post_init__(self) -> None:
        check_int("prompt.intrinsic_dim", self.intrinsic_dim, 1)
        check_int("prompt.n_prompt_tokens", self.n_prompt_tokens, 1)
        check_positive("prompt.alpha", self.alpha)
        check_choice("prompt.init", self.init, PROMPT_INITS)
        if self.deep_layers is not None:
            check_int("prompt.deep_layers", self.deep_layers, 1)


@dataclass(frozen=True)
class SearchConfig:
    """Black-box search and budget.

    Args:
        budget_calls: black-box calls to spend on the train batch (one call = one prompt
            on one batch). Dev evaluations are counted apart, as in BBT.
        popsize: lambda; None derives ``4 + int(3 ln d)`` (pycma's default).
        sigma0: CMA-ES initial step size.
        loss: fitness ``ce`` or ``hinge``; None takes the task's default.
        eval_every_calls: E, dev evaluation period in calls.
        cma_options: passed through to ``cma.CMAEvolutionStrategy`` (``popsize``,
            ``seed`` and ``sigma0`` are set from the fields above and refused here).
        white_box_lr: Adam learning rate on z for the ``white_box`` method.
    """

    budget_calls: int = 100
    popsize: Optional[int] = None
    sigma0: float = 1.0
    loss: Optional[str] = None
    eval_every_calls: int = 20
    cma_options: Mapping[str, Any] = field(default_factory=dict)
    white_box_lr: float = 0.1

    def __post_init__(self) -> None:
        check_int("search.budget_calls", self.budget_calls, 0)
        if self.popsize is not None:
            check_int("search.popsize", self.popsize, 2)
        check_positive("search.sigma0", self.sigma0)
        if self.loss is not None:
            check_choice("search.loss", self.loss, LOSSES)
        check_int("search.eval_every_calls", self.eval_every_calls, 1)
        check_positive("search.white_box_lr", self.white_box_lr)
        clash = sorted({"popsize", "seed", "sigma0", "CMA_seed"} & set(self.cma_options))
        if clash:
            raise ConfigError(
                f"search.cma_options sets {clash}, which are configured by their own fields. "
                "Either set search.popsize / search.sigma0 / seed or remove them from cma_options."
            )
        object.__setattr__(self, "cma_options", dict(self.cma_options))

    def resolved_popsize(self, intrinsic_dim: int) -> int:
        """lambda, derived in one place as an integer (purecma's default)."""
        return self.popsize if self.popsize is not None else 4 + int(3 * math.log(intrinsic_dim))


@dataclass(frozen=True)
class StudentConfig:
    """Distillation of the teacher into the local student (docs/method.md, step 3).

    Args:
        k_steps: K, optimizer steps on the replay buffer per generation.
        batch_rows: (candidate, example) rows per step, split across workers.
        lr: Adam learning rate of the head (and body, if trained).
        projection_lr: Adam learning rate of the learned projection A_S and P0_S.
        tau: distillation temperature.
        beta: weight of the cross-entropy on gold labels.
        rank_weight: weight of a pairwise ranking term over each population's fitness
            (student ordering matched to the teacher's); 0 disables it.
        buffer_candidates: replay buffer bound, in candidates (each holds its batch's logits).
        train_body: also fine-tune the student's transformer body.
        precision: the arithmetic of the student's predictions (no gradient): ``float32``,
            ``bfloat16`` (autocast), or ``auto`` (bfloat16 where the processor computes it
            natively). Training steps and gradients always run in float32.
        overlap_distill: run the K steps on a generation's answers while the next
            generation's candidates are with the teacher. gdfo's gradient then comes from
            a student one generation behind; it pays where the student and the teacher
            do not share processors (a GPU student, a remote teacher).
        max_rows_per_forward: rows per forward of the student. Small chunks of rows sorted by
            length pad less: 16 made SST-2's 10 steps of 64 rows 29% faster than 64 on a 2-core CPU
            (benchmarks/fidelity.py).
        fidelity_rows: train rows on which the student's predicted fitness of a population is
            compared with the teacher's (a fixed random subset per run; all rows when there are
            fewer). Predicting a population is a diagnostic: on DBPedia's 224 rows it would cost
            more than the teacher's calls.
        z_shift: add to the student's logits a class shift linear in z (``z U``, U of d x C),
            trained with the projection: the part of the teacher's response to z that all
            examples share, learnt from few candidates.
        gp_scale, gp_nugget: the ``gp`` student's RBF length scale, in units of the median
            distance between the answered candidates, and its noise (added to the kernel's
            diagonal). 0.5 and 0.01 ranked best among the GPs of the fidelity study.
        text_cache: the student reads each example's text apart from the prompt: its
            template puts the text first, the text's tokens attend only to each other, and
            the prompt and the label slot attend to them. The text's states are then the
            same for every candidate, computed once per run, and each step runs only the
            prompt and the few tokens after it. Needs a frozen body (``train_body=false``).
    """

    k_steps: int = 10
    batch_rows: int = 64
    lr: float = 1e-3
    projection_lr: float = 1e-3
    tau: float = 2.0
    beta: float = 0.1
    rank_weight: float = 0.0
    buffer_candidates: int = 2000
    train_body: bool = False
    overlap_distill: bool = False
    precision: str = "auto"
    z_shift: bool = False
    max_rows_per_forward: int = 16
    fidelity_rows: int = 32
    text_cache: bool = True
    gp_scale: float = 0.5
    gp_nugget: float = 0.01

    def __post_init__(self) -> None:
        check_positive("student.gp_scale", self.gp_scale)
        check_positive("student.gp_nugget", self.gp_nugget)
        check_int("student.k_steps", self.k_steps, 0)
        check_int("student.batch_rows", self.batch_rows, 1)
        check_positive("student.lr", self.lr)
        check_positive("student.projection_lr", self.projection_lr)
        check_positive("student.tau", self.tau)
        check_positive("student.beta", self.beta, allow_zero=True)
        check_positive("student.rank_weight", self.rank_weight, allow_zero=True)
        check_int("student.buffer_candidates", self.buffer_candidates, 1)
        check_int("student.max_rows_per_forward", self.max_rows_per_forward, 1)
        check_int("student.fidelity_rows", self.fidelity_rows, 2)
        check_choice("student.precision", self.precision, ("auto", "float32", "bfloat16"))
        if self.text_cache and self.train_body:
            raise ConfigError(
                "student.text_cache reuses the text's states computed once by a frozen body, so it cannot be "
                "combined with student.train_body=true; set student.text_cache=false to train the body."
            )


@dataclass(frozen=True)
class HarmonizeConfig:
    """The harmonized update (docs/method.md, step 5; :func:`~gdfo_ray.harmonize.harmonize`).

    The defaults are the update every campaign so far ran; the other settings are the
    redesigns measured on the oracle student (issue 21).

    Args:
        eta: gradient step length in units of sigma * sqrt(d).
        gamma: how far the mean moves toward z_GD; 0 = inject only.
        control: ``random`` replaces -g by a random direction of the same step length.
        gate: ``rho`` scales the mean's move by max(rho, 0), the agreement of -g with
            CMA-ES's own step; ``none`` always moves it by gamma; ``off`` neither injects
            nor moves (the student rides along: bbt's trajectory, with its fidelity and rho
            measured; how ``benchmarks/fidelity.py`` replays students on recorded answers).
        n_candidates: gradient candidates in each population, along -g at step lengths
            eta x (..., 0.5, 1, 2) (a line search paid in calls: they take the place of
            CMA-ES samples, so a generation costs lambda calls still).
        mean_to_best: when a gradient candidate beats every CMA-ES sample of its
            generation, the mean jumps to it.
        warmup_steps: generations of plain gradient steps before CMA-ES takes over, one
            call each: a step of eta sigma0 sqrt(d) along -g, kept if it lowers the loss
            (then 1.5x longer), else halved.
        keep_sigma: after the mean moved toward a gradient candidate, sigma does not fall
            below its value before the generation.
        guided_share: share of each population drawn by guided ES (Maheswaranathan et al.,
            2019) instead of by CMA-ES: from ``sigma^2 d [(alpha/d) I + ((1 - alpha)/k) U U^T]``
            around the mean, U an orthonormal basis of the last ``guided_k`` gradients; 0: none.
        guided_k: gradients whose span the guided samples favour.
        guided_alpha: the guided samples' share of variance outside that span, in (0, 1].
        adapt_eta: the gradient candidates' step length adapts to success: 1.5x after a
            generation where one beat every CMA-ES sample, 0.5x after one where none did (as
            the warm-up's step), within [eta/16, 16 eta].
    """

    eta: float = 0.5
    gamma: float = 0.5
    control: str = "none"
    gate: str = "rho"
    n_candidates: int = 1
    mean_to_best: bool = False
    warmup_steps: int = 0
    keep_sigma: bool = False
    guided_share: float = 0.0
    guided_k: int = 1
    guided_alpha: float = 0.5
    adapt_eta: bool = False

    def __post_init__(self) -> None:
        check_positive("harmonize.eta", self.eta, allow_zero=True)
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"harmonize.gamma must be in [0, 1], but got {self.gamma!r}.")
        check_choice("harmonize.control", self.control, CONTROLS)
        check_choice("harmonize.gate", self.gate, GATES)
        check_int("harmonize.n_candidates", self.n_candidates, 1)
        check_int("harmonize.warmup_steps", self.warmup_steps, 0)
        if not (isinstance(self.guided_share, (int, float)) and 0.0 <= self.guided_share < 1.0):
            raise ConfigError(f"harmonize.guided_share must be in [0, 1), but got {self.guided_share!r}.")
        check_int("harmonize.guided_k", self.guided_k, 1)
        if not (isinstance(self.guided_alpha, (int, float)) and 0.0 < self.guided_alpha <= 1.0):
            raise ConfigError(f"harmonize.guided_alpha must be in (0, 1], but got {self.guided_alpha!r}.")
        for name in ("mean_to_best", "keep_sigma", "adapt_eta"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"harmonize.{name} must be true or false, but got {getattr(self, name)!r}.")

    def guided_in(self, popsize: int) -> int:
        """Guided samples in a population of ``popsize``: ``guided_share`` of it, at least one when the share is set."""
        return max(1, round(self.guided_share * popsize)) if self.guided_share > 0 else 0


@dataclass(frozen=True)
class PoolConfig:
    """Where the work runs.

    Args:
        backend: ``ray`` (actors on a Ray cluster) or ``local`` (same code, in-process).
        ray_address: the cluster to join (default: ``$RAY_ADDRESS``, else the one the last
            ``ray start`` on this machine registered, else Ray starts here); ``local`` always
            starts Ray here.
        n_teacher_actors: teacher-query actors evaluating candidates in parallel.
        n_student_workers: student workers, data-parallel (gradients averaged).
        teacher_num_cpus, student_num_cpus, teacher_num_gpus, student_num_gpus: each
            actor's resource request (fractions allowed). ``student_num_gpus=None`` asks
            for one GPU per worker when the cluster has GPUs and the student is a network
            (a ``gp`` student computes on the CPU), else none.
        teacher_resources: extra custom resources per teacher actor (e.g. ``{"teacher": 1}``).
        torch_threads: intra-op threads per actor; 0 uses every core of the node, since
            the teacher and student take turns rather than run together on a laptop.
        ray_num_cpus: CPUs of a Ray instance started locally (None: all).
        calls_per_actor: calls one teacher-query actor keeps in flight (threads). Only a
            service teacher gains from more than 1: its actors wait on the network. More
            actors scale better than more threads (benchmarks/pool_scaling.py).
        calls_per_s: rate limit on teacher calls, shared by every actor of the pool
            (retries included); None: no limit.
        max_in_flight: limit on teacher calls in flight across the pool; None: no limit.
        rate_burst: calls that may start at once before ``calls_per_s`` paces them.
        max_actor_restarts: how often Ray restarts a dead teacher actor or student worker.
        max_requeries: how often a piece of work lost with its actor is sent again.
        wait_for_resources_s: how long a run waits for the cluster to hold the CPUs, GPUs and
            custom resources its actors ask for (an autoscaler adding nodes) before it fails
            with a message naming what is missing, instead of waiting forever.
    """

    backend: str = "ray"
    ray_address: Optional[str] = None
    n_teacher_actors: int = 1
    n_student_workers: int = 1
    teacher_num_cpus: float = 1.0
    student_num_cpus: float = 1.0
    teacher_num_gpus: float = 0.0
    student_num_gpus: Optional[float] = None
    teacher_resources: Mapping[str, float] = field(default_factory=dict)
    torch_threads: int = 0
    ray_num_cpus: Optional[int] = None
    calls_per_actor: int = 1
    calls_per_s: Optional[float] = None
    max_in_flight: Optional[int] = None
    rate_burst: int = 1
    max_actor_restarts: int = 3
    max_requeries: int = 3
    wait_for_resources_s: float = 60.0

    def __post_init__(self) -> None:
        check_choice("pool.backend", self.backend, BACKENDS)
        check_positive("pool.wait_for_resources_s", self.wait_for_resources_s, allow_zero=True)
        check_int("pool.calls_per_actor", self.calls_per_actor, 1)
        if self.calls_per_s is not None:
            check_positive("pool.calls_per_s", self.calls_per_s)
        if self.max_in_flight is not None:
            check_int("pool.max_in_flight", self.max_in_flight, 1)
        check_int("pool.rate_burst", self.rate_burst, 1)
        check_int("pool.max_actor_restarts", self.max_actor_restarts, 0)
        check_int("pool.max_requeries", self.max_requeries, 0)
        check_int("pool.n_teacher_actors", self.n_teacher_actors, 1)
        check_int("pool.n_student_workers", self.n_student_workers, 1)
        check_positive("pool.teacher_num_cpus", self.teacher_num_cpus, allow_zero=True)
        check_positive("pool.student_num_cpus", self.student_num_cpus, allow_zero=True)
        check_positive("pool.teacher_num_gpus", self.teacher_num_gpus, allow_zero=True)
        if self.student_num_gpus is not None:
            check_positive("pool.student_num_gpus", self.student_num_gpus, allow_zero=True)
        check_int("pool.torch_threads", self.torch_threads, 0)
        object.__setattr__(self, "teacher_resources", dict(self.teacher_resources))

    @property
    def limited(self) -> bool:
        """Whether teacher calls go through a rate limiter (``calls_per_s`` or ``max_in_flight`` set)."""
        return self.calls_per_s is not None or self.max_in_flight is not None


@dataclass(frozen=True)
class ServiceConfig:
    """How to talk to a teacher that is a service (``model.teacher`` is a URL).

    Args:
        token_env: environment variable holding the bearer token. The token itself is
            never part of a config, so it never lands in a results directory.
        timeout_s: per-request timeout.
        max_retries: retries of a call after a 5xx, a timeout, a lost connection or a 429
            that does not say when to come back.
        backoff_s, backoff_max_s: exponential backoff with full jitter: the k-th retry
            waits a uniform time in [0, min(backoff_max_s, backoff_s * 2**k)].
        max_retry_after_s: the longest a call waits on 429s that say when to come back
            (``Retry-After``, ``Retry-After-Ms``), in all; a service asking for more fails the
            call with a clear error instead of stalling the run.
        max_outage_s: how long a run waits out a service that answers nothing or 5xx. Past
            ``max_retries`` quick retries, the call pauses, probes ``/v1/health`` with backoff
            capped at ``probe_max_s`` and goes on when the service is back; only an outage longer
            than this stops the run (``--resume`` then repeats the generation). 0: no waiting.
        probe_max_s: the longest pause between two health probes during an outage.
    """

    token_env: str = "GDFO_TEACHER_TOKEN"
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 300.0
    max_outage_s: float = 300.0
    probe_max_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.token_env or not isinstance(self.token_env, str):
            raise ConfigError(f"service.token_env must name an environment variable, but got {self.token_env!r}.")
        check_positive("service.timeout_s", self.timeout_s)
        check_int("service.max_retries", self.max_retries, 0)
        check_positive("service.backoff_s", self.backoff_s, allow_zero=True)
        check_positive("service.backoff_max_s", self.backoff_max_s, allow_zero=True)
        check_positive("service.max_retry_after_s", self.max_retry_after_s, allow_zero=True)
        check_positive("service.max_outage_s", self.max_outage_s, allow_zero=True)
        check_positive("service.probe_max_s", self.probe_max_s)


@dataclass(frozen=True)
class RunSeeds:
    """Every random stream of a run, derived in this one place from its seed, and recorded with its results."""

    run: int  # the driver's generator: kd's noise, the random control's directions
    replay: int  # the student's replay batches, apart from ``run`` so that no student moves the control's directions
    cma: int  # pycma's seed; pycma reads 0 as "from the clock", hence seed + 1 (bbtv2: cma * 1000 + layer)
    prompt_space: int  # A and P0 of the intrinsic space
    student_init: int  # the student's own projection and prompt tokens
    torch: int  # torch's global generator in every process that builds a model
    fidelity_rows: int  # the train rows on which fidelity is measured
    split: int  # the few-shot split

    @classmethod
    def derive(cls, seed: int, split_seed: Optional[int] = None) -> "RunSeeds":
        """The seeds of a run of ``seed`` (and of the few-shot split ``split_seed``, by default the run's).

        >>> RunSeeds.derive(42).cma, RunSeeds.derive(42, split_seed=13).split
        (43, 13)
        """
        return cls(run=seed, replay=seed + 3, cma=seed + 1, prompt_space=seed, student_init=seed + 1, torch=seed,
                   fidelity_rows=seed + 7, split=seed if split_seed is None else split_seed)


@dataclass(frozen=True)
class GDFOConfig:
    """Everything one run needs; ``asdict(config)`` is stored with every result.

    Example:
        .. code-block:: python

            from gdfo_ray import GDFOConfig, run
            config = GDFOConfig.from_dict({"method": "bbt", "search": {"budget_calls": 40}})
            result = run(config)
    """

    method: str = "gdfo"
    seed: int = 42
    output_dir: Optional[str] = None
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    harmonize: HarmonizeConfig = field(default_factory=HarmonizeConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_int("seed", self.seed, 0)
        if self.method == "white_box" and (self.model.teacher_is_service or self.model.teacher_is_recording):
            what = "black-box service" if self.model.teacher_is_service else "recording of answers"
            raise ConfigError(
                f"method 'white_box' needs the teacher's gradients, but model.teacher={self.model.teacher!r} is a "
                f"{what}. Either pass a local model id or path, or choose another method."
            )
        if self.model.student_spec.kind == "oracle" and (self.student.train_body or self.student.z_shift):
            raise ConfigError(
                f"model.student={self.model.student!r} keeps the teacher frozen so that its gradient is exact, so it "
                "cannot be combined with student.train_body=true or student.z_shift=true. Use 'sibling:K' to train a "
                "student cut from the teacher."
            )
        popsize = self.search.resolved_popsize(self.prompt.intrinsic_dim)
        if self.harmonize.n_candidates >= popsize:
            raise ConfigError(f"harmonize.n_candidates={self.harmonize.n_candidates} leaves no CMA-ES sample in a "
                              f"population of {popsize}. Choose at most {popsize - 1}, or raise search.popsize.")
        guided = self.harmonize.guided_in(popsize)
        if guided and self.harmonize.n_candidates + guided > popsize - 2:
            raise ConfigError(
                f"harmonize.guided_share={self.harmonize.guided_share} gives {guided} guided samples beside "
                f"{self.harmonize.n_candidates} gradient candidates in a population of {popsize}; CMA-ES needs 2 "
                "samples of its own. Lower harmonize.guided_share or harmonize.n_candidates, or raise search.popsize."
            )
        per_generation = 1 if self.method == "white_box" else popsize
        if self.method != "manual" and self.search.budget_calls < per_generation:
            raise ConfigError(
                f"search.budget_calls={self.search.budget_calls} is smaller than one generation "
                f"of method {self.method!r} ({per_generation} calls). Either raise "
                "search.budget_calls or lower search.popsize."
            )

    @property
    def uses_student(self) -> bool:
        return self.method in ("kd", "gdfo")

    def service_token(self, given: Optional[str] = None) -> str:
        """The teacher service's bearer token: ``given``, else ``$<service.token_env>``; never part of a config.

        Raises:
            TeacherError: there is none.
        """
        token = given or os.environ.get(self.service.token_env)
        if not token:
            raise TeacherError(f"No token for the teacher service {self.model.teacher}: set ${self.service.token_env} "
                               "(service.token_env) to the token the service was started with.")
        return token

    @property
    def seeds(self) -> RunSeeds:
        return RunSeeds.derive(self.seed, self.task.split_seed)

    @property
    def popsize(self) -> int:
        return self.search.resolved_popsize(self.prompt.intrinsic_dim)

    def default_output_dir(self) -> str:
        """``runs/<task>_<method>_seed<seed>``: stable, so ``--resume`` finds it."""
        return os.path.join("runs", f"{self.task.name}_{self.label}_seed{self.seed}")

    @property
    def label(self) -> str:
        """The run's name in outputs and reports (:func:`run_label`)."""
        return run_label(self.method, self.harmonize.control)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GDFOConfig":
        """Build from a nested dict (a YAML file), refusing unknown keys by name."""
        return _build(cls, data, prefix="")

    def with_overrides(self, overrides: Mapping[str, Any]) -> "GDFOConfig":
        """A copy with dotted-key overrides applied, e.g. ``{"search.popsize": 10}``."""
        return GDFOConfig.from_dict(apply_overrides(self.to_dict(), overrides))


def apply_overrides(data: dict, overrides: Mapping[str, Any]) -> dict:
    """Set dotted keys in a nested config dict, refusing unknown ones by name."""
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"Unknown config section {part!r} in override {key!r}.")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(_unknown_key_message(key, list(node)))
        node[parts[-1]] = value
    return data


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict:
    """``update`` over ``base``, section by section; unknown keys are kept so that validation names them."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "cma_options":
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# Keys read only when the test set is scored, after the search: a run may resume with another value.
EVALUATION_ONLY_KEYS = ("task.max_test_examples",)

# Settings added after runs were saved, with the value that reproduces what the code did before they existed.
ADDED_SETTINGS: dict = {"model.record_answers": None, "model.max_tokens_per_forward": None,
                        "task.max_text_chars": None, "student.text_cache": False, "student.gp_scale": 0.5, "student.gp_nugget": 0.01,
                        "harmonize.gate": "rho", "harmonize.n_candidates": 1, "harmonize.mean_to_best": False,
                        "harmonize.warmup_steps": 0, "harmonize.keep_sigma": False, "harmonize.guided_share": 0.0,
                        "harmonize.guided_k": 1, "harmonize.guided_alpha": 0.5, "harmonize.adapt_eta": False}


def resumed_config_dict(saved: Mapping[str, Any]) -> dict:
    """A saved run's config as a full nested dict: today's defaults, the saved values over them, and a setting
    added since it was saved at the value :data:`ADDED_SETTINGS` gives (what reproduces that run)."""
    return apply_overrides(GDFOConfig().to_dict(), flatten_saved_config(saved))


def flatten_saved_config(saved: Mapping[str, Any]) -> dict:
    """A saved run's config flattened, a setting added since it was saved read as :data:`ADDED_SETTINGS` says."""
    return {**ADDED_SETTINGS, **flatten_config(saved)}


# Settings that cannot change what a run computes: where it ran and read its data, a recording of its answers,
# and how its forwards are cut (that changes the rounding only, as the machine does).
LOCATION_KEYS = ("pool.", "service.", "output_dir", "task.data_dir", "model.record_answers",
                 "model.max_rows_per_forward", "model.max_tokens_per_forward")


def setting_differences(saved: Mapping[str, Any], current: "GDFOConfig", finished: bool = False,
                        scored_rows: Optional[int] = None) -> list:
    """The settings in which a saved run differs from ``current`` in a way that can change its result.

    The one rule of resuming a run (``--resume``) and of counting a finished run as done
    (a campaign's cells, ``--reuse``). Left out: :data:`LOCATION_KEYS`; the student and the
    update when the method uses neither; a key the saved config lacks is read as
    :data:`ADDED_SETTINGS` says. The test-row cap (:data:`EVALUATION_ONLY_KEYS`) is free while
    the run has not scored its test set; once it has (``finished``), only if the cap never cut
    its ``scored_rows`` rows, before or now (unknown: it matters).
    """
    free = LOCATION_KEYS + (() if current.uses_student else ("student.", "model.student", "harmonize."))
    flat_saved, flat_now = flatten_saved_config(saved), flatten_config(current.to_dict())
    differs = sorted(k for k in set(flat_saved) | set(flat_now)
                     if flat_saved.get(k) != flat_now.get(k) and not k.startswith(free))
    cap = "task.max_test_examples"
    if not finished or (scored_rows is not None
                        and _cap_never_reached(scored_rows, flat_saved.get(cap), flat_now.get(cap))):
        differs = [k for k in differs if k not in EVALUATION_ONLY_KEYS]
    return differs


def _cap_never_reached(n_scored: int, saved_cap: Optional[int], cap_now: Optional[int]) -> bool:
    """Whether a test set of ``n_scored`` rows, scored in full before, would be scored in full again."""
    return (saved_cap is None or n_scored < saved_cap) and (cap_now is None or n_scored <= cap_now)


def flatten_config(d: Mapping[str, Any], prefix: str = "") -> dict:
    """A nested config dict as ``{dotted.key: value}`` (the free-form mappings stay values)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and k not in ("cma_options", "teacher_resources"):
            out.update(flatten_config(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def _unknown_key_message(key: str, valid: list) -> str:
    similar = difflib.get_close_matches(key.split(".")[-1], valid, n=3)
    hint = f" Similar valid keys: {similar}." if similar else ""
    return f"{key!r} is not a valid config key.{hint} Valid keys here: {sorted(valid)}."


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"Config section {prefix or '<root>'!r} must be a mapping, but got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + key, list(fields)))
        nested = _SECTIONS.get(key) if cls is GDFOConfig else None
        kwargs[key] = _build(nested, value, prefix + key + ".") if nested else value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a value of the wrong type deep inside a check
        raise ConfigError(f"Invalid value in config section {prefix or '<root>'!r}: {e}") from e


_SECTIONS = {
    "task": TaskConfig,
    "model": ModelConfig,
    "prompt": PromptConfig,
    "search": SearchConfig,
    "student": StudentConfig,
    "harmonize": HarmonizeConfig,
    "pool": PoolConfig,
    "service": ServiceConfig,
}


# Reading a config: the one loader of the CLI, campaigns, sweeps, reports and benchmarks.

@functools.cache
def _yaml_loader() -> type:
    """YAML's safe loader with YAML 1.2's booleans: only true and false.

    YAML 1.1 also reads on/off/yes/no as booleans, so ``gate: off`` (a word of the config) reached
    it as False and failed as a bad value.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    bool_tag = "tag:yaml.org,2002:bool"
    Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
                                      for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    return Loader


def load_yaml(stream):
    """A config's YAML (a file or text), read as :func:`_yaml_loader` says."""
    import yaml

    return yaml.load(stream, Loader=_yaml_loader())


def read_config_file(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            data = load_yaml(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"Cannot read config file {path!r}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path!r} must hold a mapping of sections, not {type(data).__name__}.")
    return data


def parse_sets(items: Sequence[str]) -> dict:
    """``--set key=value`` items as dotted-key overrides; values are parsed as YAML."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, but got {item!r}.")
        overrides[key.strip()] = load_yaml(value)
    return overrides


def build_config_dict(path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None,
                      sets: Sequence[str] = (), sections: Optional[Mapping[str, Any]] = None) -> dict:
    """A full config as a nested dict: the defaults, then ``sections`` (nested), the YAML file at ``path``,
    ``overrides`` (dotted keys) and ``--set`` items, each over the last. Validate it with
    :meth:`GDFOConfig.from_dict`; the one way a config is built from what a user gives."""
    data = deep_merge(GDFOConfig().to_dict(), dict(sections or {}))
    if path:
        data = deep_merge(data, read_config_file(path))
    return apply_overrides(data, {**dict(overrides or {}), **parse_sets(sets)})
