"""Tasks: data plus a template and a verbalizer.

The seven BBT benchmark tasks are presets of one mechanism; a user's own task is
a :class:`~gdfo_ray.config.TaskConfig` with labels, verbalizer, template and files.
Data comes from (in this order) the user's files, a BBT-layout data directory
(``task.data_dir`` or ``$GDFO_DATA_DIR``), the package's own copy of the default
task's split (SST-2, split seed 42), or the Hugging Face Hub with BBT's
sampling (k per class for train and for dev, both from the train split).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from gdfo_ray.config import DATA_DIR_ENV, TaskConfig
from gdfo_ray.exceptions import ConfigError, DataError


# The default task's few-shot split, shipped with the package (gdfo_ray/data/README.md says where it came from).
PACKAGED_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@dataclass(frozen=True)
class TaskSpec:
    """A task's fixed parts. Templates use ``{prompt}``, ``{text}``, ``{text_pair}``, ``{mask}``.

    ``template_mlm`` follows BBT (masked LMs); ``template_clm`` puts the label slot
    last, since a causal LM can only score the next token. Verbalizers follow BBT,
    except where a word is not one token in the default teacher's BPE: DBpedia uses
    ``Sports`` for Athlete (as rl-prompt does) and ``Music`` for Album.
    """

    name: str
    labels: tuple
    verbalizer: tuple
    pair: bool
    metric: str
    loss: str
    template_mlm: str
    template_clm: str
    hf_dataset: Optional[str] = None  # "name" or "name/config"
    hf_test_split: str = "test"
    hf_fields: tuple = ("text", None, "label")  # text, text_pair, label

    def template_for(self, kind: str) -> str:
        return self.template_clm if kind == "causal_lm" else self.template_mlm

    @property
    def n_classes(self) -> int:
        return len(self.labels)


_SENT_MLM = "{prompt} . {text} . It was {mask} ."
_SENT_CLM = "{prompt} {text} It was {mask}"
_PAIR_MLM = "{prompt} . {text} ? {mask} , {text_pair}"

PRESETS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("sst2", ("negative", "positive"), ("bad", "great"), False, "accuracy", "ce",
                 _SENT_MLM, _SENT_CLM, "glue/sst2", "validation", ("sentence", None, "label")),
        TaskSpec("yelp_polarity", ("negative", "positive"), ("bad", "great"), False, "accuracy", "ce",
                 _SENT_MLM, _SENT_CLM, "yelp_polarity", "test", ("text", None, "label")),
        TaskSpec("ag_news", ("world", "sports", "business", "technology"),
                 ("World", "Sports", "Business", "Tech"), False, "accuracy", "ce",
                 "{prompt} . {mask} News: {text}", "{prompt} {text} This news is about {mask}",
                 "ag_news", "test", ("text", None, "label")),
        TaskSpec("dbpedia",
                 ("Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder",
                  "MeanOfTransportation", "Building", "NaturalPlace", "Village", "Animal", "Plant",
                  "Album", "Film", "WrittenWork"),
                 ("Company", "Education", "Artist", "Sports", "Office", "Transportation", "Building",
                  "Natural", "Village", "Animal", "Plant", "Music", "Film", "Written"),
                 False, "accuracy", "ce",
                 "{prompt} [ Category: {mask} ] {text}", "{prompt} {text} Category: {mask}",
                 "dbpedia_14", "test", ("content", None, "label")),
        TaskSpec("mrpc", ("not_equivalent", "equivalent"), ("No", "Yes"), True, "f1", "hinge",
                 _PAIR_MLM, "{prompt} {text} {text_pair} Do both sentences mean the same? {mask}",
                 "glue/mrpc", "validation", ("sentence1", "sentence2", "label")),
        TaskSpec("snli", ("entailment", "neutral", "contradiction"), ("Yes", "Maybe", "No"), True,
                 "accuracy", "hinge", _PAIR_MLM,
                 "{prompt} {text} Question: {text_pair} Yes, Maybe or No? Answer: {mask}",
                 "snli", "test", ("premise", "hypothesis", "label")),
        TaskSpec("rte", ("entailment", "not_entailment"), ("Yes", "No"), True, "accuracy", "hinge",
                 _PAIR_MLM, "{prompt} {text} Question: {text_pair} Yes or No? Answer: {mask}",
                 "glue/rte", "validation", ("sentence1", "sentence2", "label")),
    ]
}


@dataclass
class Split:
    """Examples of one split; ``text_pair`` is None for single-text tasks."""

    text: list
    text_pair: Optional[list]
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.text)

    def subset(self, idx: Sequence[int]) -> "Split":
        idx = list(idx)
        return Split([self.text[i] for i in idx],
                     None if self.text_pair is None else [self.text_pair[i] for i in idx],
                     self.label[idx])

    def truncated(self, max_chars: int) -> "Split":
        """The split with every text field cut to ``max_chars`` characters."""
        return Split([t[:max_chars] for t in self.text],
                     None if self.text_pair is None else [t[:max_chars] for t in self.text_pair], self.label)


@dataclass
class TaskData:
    spec: TaskSpec
    train: Split
    dev: Split
    test: Split
    source: str  # where the rows came from, recorded with the run

    def split(self, name: str) -> Split:
        if name not in ("train", "dev", "test"):
            raise ValueError(f"split must be 'train', 'dev' or 'test', but got {name!r}.")
        return getattr(self, name)


def resolve_spec(config: TaskConfig) -> TaskSpec:
    """The task's spec: a preset with the config's overrides, or a custom task."""
    base = PRESETS.get(config.name)
    if base is None:
        missing = [f for f in ("labels", "verbalizer", "template") if getattr(config, f) is None]
        if missing:
            raise ConfigError(
                f"task.name={config.name!r} is not a preset ({sorted(PRESETS)}), so a custom task "
                f"needs task.{', task.'.join(missing)}. Either pick a preset or set them."
            )
        if not (config.train_file or config.hf_dataset or config.resolved_data_dir()):
            raise ConfigError(
                f"Custom task {config.name!r} needs its data: task.train_file/dev_file/test_file, a data root "
                f"(--data-dir or ${DATA_DIR_ENV}) holding {config.name}/16-shot/<seed>/{{train,dev}}.jsonl and "
                f"{config.name}/test.jsonl, or task.hf_dataset.")
    labels = tuple(config.labels) if config.labels is not None else base.labels
    verbalizer = tuple(config.verbalizer) if config.verbalizer is not None else base.verbalizer
    if len(verbalizer) != len(labels):
        raise ConfigError(
            f"task.verbalizer has {len(verbalizer)} words but the task has {len(labels)} labels "
            f"{list(labels)}; give exactly one word per class."
        )
    if len(labels) < 2:
        raise ConfigError(f"task.labels must name at least 2 classes, but got {list(labels)}.")
    pair = config.pair if config.pair is not None else (base.pair if base else False)
    template_mlm = config.template or base.template_mlm
    template_clm = config.template or base.template_clm
    for template in {template_mlm, template_clm}:
        validate_template(template, pair)
    if config.prompt_placement == "suffix":
        template_clm = move_prompt_after_text(template_clm)
    return TaskSpec(
        name=config.name,
        labels=labels,
        verbalizer=verbalizer,
        pair=pair,
        metric=config.metric or (base.metric if base else "accuracy"),
        loss=base.loss if base else "ce",
        template_mlm=template_mlm,
        template_clm=template_clm,
        hf_dataset=config.hf_dataset or (base.hf_dataset if base else None),
        hf_test_split=base.hf_test_split if base else "test",
        hf_fields=base.hf_fields if base else ("text", "text_pair" if pair else None, "label"),
    )


def move_prompt_after_text(template: str) -> str:
    """``{prompt}`` moved right after the last text field, so everything before it is fixed per example.

    >>> move_prompt_after_text("{prompt} {text} Question: {text_pair} Yes or No? Answer: {mask}")
    '{text} Question: {text_pair} {prompt} Yes or No? Answer: {mask}'
    >>> move_prompt_after_text("{prompt} {text} It was {mask}")
    '{text} {prompt} It was {mask}'
    """
    rest = " ".join(template.replace("{prompt}", " ").split())
    last = max(rest.rfind(field) + len(field) for field in ("{text}", "{text_pair}") if field in rest)
    return (rest[:last] + " {prompt}" + rest[last:]).strip()


def text_first_template(template: str) -> str:
    """The template's words and text fields in their order, then ``{prompt}``, then the label slot.

    The form in which everything before the prompt is the example alone, so its states can
    be computed once, apart from the prompt (a student with ``student.text_cache``), and
    each candidate runs only the prompt and the slot.

    >>> text_first_template("{prompt} . {text} . It was {mask} .")
    '. {text} . It was . {prompt} {mask}'
    >>> text_first_template("{prompt} . {text} ? {mask} , {text_pair}")
    '. {text} ? , {text_pair} {prompt} {mask}'
    """
    words = " ".join(template.replace("{prompt}", " ").replace("{mask}", " ").split())
    return f"{words} {{prompt}} {{mask}}"


def validate_template(template: str, pair: bool) -> None:
    for slot in ("{prompt}", "{text}", "{mask}"):
        if template.count(slot) != 1:
            raise ConfigError(f"task.template must contain {slot} exactly once, but got {template!r}.")
    if pair and template.count("{text_pair}") != 1:
        raise ConfigError(f"task.template of a pair task must contain {{text_pair}} once, got {template!r}.")
    if not pair and "{text_pair}" in template:
        raise ConfigError(f"task.template has {{text_pair}} but the task is not a pair task: {template!r}.")


def load_task(config: TaskConfig, seed: int) -> TaskData:
    """Load train/dev/test for ``config`` (see the module docstring for the order of sources)."""
    spec = resolve_spec(config)
    split_seed = config.split_seed if config.split_seed is not None else seed
    if config.train_file:
        if not (config.dev_file and config.test_file):
            raise ConfigError("task.train_file needs task.dev_file and task.test_file too.")
        splits = [read_split_file(p, spec) for p in (config.train_file, config.dev_file, config.test_file)]
        data = TaskData(spec, *splits, source=f"files: {config.train_file}, {config.dev_file}, {config.test_file}")
    elif config.resolved_data_dir() and (os.path.isdir(os.path.join(config.resolved_data_dir(), spec.name))
                                         or not spec.hf_dataset):
        # The data root serves the tasks it holds; one it lacks comes from the Hub where it names a dataset.
        data = _load_bbt_dir(config.resolved_data_dir(), spec, split_seed)
    elif (config.shots == 16 and not config.hf_dataset
          and os.path.isdir(os.path.join(PACKAGED_DATA_DIR, spec.name, "16-shot", str(split_seed)))):
        data = _load_bbt_dir(PACKAGED_DATA_DIR, spec, split_seed)
        data.source = f"the gdfo_ray package's own copy of {spec.name} (split seed {split_seed})"
    else:
        data = _load_hf(spec, config.shots, split_seed)
    if config.max_text_chars is not None:
        for name in ("train", "dev", "test"):
            setattr(data, name, data.split(name).truncated(config.max_text_chars))
    if config.max_test_examples is not None and len(data.test) > config.max_test_examples:
        rng = np.random.default_rng(split_seed)
        idx = np.sort(rng.choice(len(data.test), size=config.max_test_examples, replace=False))
        data.test = data.test.subset(idx)
        data.source += f" (test subsampled to {config.max_test_examples} rows, seed {split_seed})"
    return data


def _load_bbt_dir(root: str, spec: TaskSpec, split_seed: int) -> TaskData:
    task_dir = os.path.join(root, spec.name)
    if not os.path.isdir(task_dir):
        raise DataError(f"No directory for task {spec.name!r} under data dir {root!r} (looked for {task_dir}).")
    seed_dir = os.path.join(task_dir, "16-shot", str(split_seed))
    if not os.path.isdir(seed_dir):
        shots_dir = os.path.join(task_dir, "16-shot")
        available = sorted(os.listdir(shots_dir), key=lambda s: (len(s), s)) if os.path.isdir(shots_dir) else []
        raise DataError(
            f"Task {spec.name!r} has no 16-shot split for seed {split_seed} in {root!r}; "
            f"available seeds: {available}. Pass --seed or task.split_seed with one of them."
        )
    files = [os.path.join(seed_dir, "train.jsonl"), os.path.join(seed_dir, "dev.jsonl"),
             os.path.join(task_dir, "test.jsonl")]
    return TaskData(spec, *(read_split_file(f, spec) for f in files), source=f"{task_dir} (split seed {split_seed})")


def read_split_file(path: str, spec: TaskSpec) -> Split:
    """Read JSONL, CSV, TSV or Parquet with columns text[, text_pair], label.

    Labels may be integers (index into ``spec.labels``) or the label names.
    """
    if not os.path.isfile(path):
        raise DataError(f"Data file {path!r} does not exist.")
    lower = path.lower()
    if lower.endswith((".jsonl", ".json")):
        rows = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{line_no} is not valid JSON: {e}") from e
    elif lower.endswith((".csv", ".tsv")):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if lower.endswith(".tsv") else ","))
    elif lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise DataError(f"Unsupported data file {path!r}: use .jsonl, .csv, .tsv or .parquet.")
    return rows_to_split(rows, spec, where=path)


def rows_to_split(rows: list, spec: TaskSpec, where: str, fields: tuple = ("text", "text_pair", "label")) -> Split:
    text_key, pair_key, label_key = fields
    if not rows:
        raise DataError(f"{where} holds no rows.")
    needed = [text_key, label_key] + ([pair_key] if spec.pair else [])
    missing = [c for c in needed if c not in rows[0]]
    if missing:
        raise DataError(f"{where} lacks column(s) {missing}; it has {sorted(rows[0])}. Needed: {needed}.")
    names = {name: i for i, name in enumerate(spec.labels)}
    labels = []
    for i, row in enumerate(rows):
        raw = row[label_key]
        if isinstance(raw, str) and raw.strip() in names:
            value = names[raw.strip()]
        else:
            try:
                value = int(raw)
            except (TypeError, ValueError):
                raise DataError(
                    f"{where} row {i}: label {raw!r} is neither an index nor one of {list(spec.labels)}."
                ) from None
        if not 0 <= value < spec.n_classes:
            raise DataError(
                f"{where} row {i}: label {value} is out of range for {spec.n_classes} classes "
                f"{list(spec.labels)}."
            )
        labels.append(value)
    text = [str(r[text_key]) for r in rows]
    pair = [str(r[pair_key]) for r in rows] if spec.pair else None
    return Split(text, pair, np.asarray(labels, dtype=np.int64))


def sample_k_shot(labels: np.ndarray, shots: int, seed: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """BBT's sampling: k per class for train and k per class for dev, disjoint, from one split."""
    rng = np.random.default_rng(seed)
    train, dev = [], []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2 * shots:
            raise DataError(f"Class {c} has {len(idx)} rows, fewer than 2 x {shots} shots for train and dev.")
        chosen = rng.choice(idx, size=2 * shots, replace=False)
        train.extend(chosen[:shots])
        dev.extend(chosen[shots:])
    return np.sort(np.asarray(train)), np.sort(np.asarray(dev))


def _load_hf(spec: TaskSpec, shots: int, seed: int) -> TaskData:
    if not spec.hf_dataset:
        raise DataError(f"Task {spec.name!r} has no Hub dataset; pass task.train_file or task.data_dir.")
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"Loading {spec.name!r} from the Hugging Face Hub needs the 'datasets' package "
            "(pip install datasets). Alternatively pass --data-dir (or $GDFO_DATA_DIR) with BBT-layout "
            "data, or task.train_file/dev_file/test_file."
        ) from e
    # A Hub id ("name" or "name/config"), or a local folder of data files in the Hub's format (train, test...).
    name, _, subset = ((spec.hf_dataset, "", "") if os.path.isdir(spec.hf_dataset)
                       else spec.hf_dataset.partition("/"))
    try:
        dataset = datasets.load_dataset(name, subset or None)
    except Exception as e:  # offline, unknown id: say what to do instead
        raise DataError(
            f"Could not load Hub dataset {spec.hf_dataset!r} ({type(e).__name__}: {e}). Offline, pass "
            "--data-dir (or $GDFO_DATA_DIR) or your own files."
        ) from e
    text_key, pair_key, label_key = spec.hf_fields
    train_rows = [r for r in dataset["train"] if int(r[label_key]) >= 0]
    test_rows = [r for r in dataset[spec.hf_test_split] if int(r[label_key]) >= 0]
    fields = (text_key, pair_key, label_key)
    pool = rows_to_split(train_rows, spec, f"{spec.hf_dataset}:train", fields)
    train_idx, dev_idx = sample_k_shot(pool.label, shots, seed, spec.n_classes)
    test = rows_to_split(test_rows, spec, f"{spec.hf_dataset}:{spec.hf_test_split}", fields)
    return TaskData(spec, pool.subset(train_idx), pool.subset(dev_idx), test,
                    source=f"hf:{spec.hf_dataset} ({shots}-shot, seed {seed})")
