import json
import os

import numpy as np
import pytest

from gdfo_ray import ConfigError, DataError
from gdfo_ray.config import TaskConfig
from gdfo_ray.tasks import PRESETS, load_task, read_split_file, resolve_spec, sample_k_shot

SHARED = os.environ.get("GDFO_DATA_DIR")


def test_custom_task_needs_labels_verbalizer_template():
    with pytest.raises(ConfigError, match="needs task.labels, task.verbalizer, task.template"):
        resolve_spec(TaskConfig(name="my_task", train_file="x.jsonl"))


def test_verbalizer_must_have_one_word_per_class():
    with pytest.raises(ConfigError, match="one word per class"):
        resolve_spec(TaskConfig(name="sst2", verbalizer=("bad",)))


def test_template_needs_every_slot():
    with pytest.raises(ConfigError, match=r"\{mask\} exactly once"):
        resolve_spec(TaskConfig(name="sst2", template="{prompt} {text}"))


def test_files_in_every_format_and_label_names(tmp_path):
    spec = PRESETS["sst2"]
    (tmp_path / "a.jsonl").write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": "negative"}\n')
    (tmp_path / "a.csv").write_text("text,label\ngood,1\nbad,0\n")
    (tmp_path / "a.tsv").write_text("text\tlabel\ngood\tpositive\nbad\t0\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["good", "bad"], "label": [1, 0]}), tmp_path / "a.parquet")
    for ext in ("jsonl", "csv", "tsv", "parquet"):
        split = read_split_file(str(tmp_path / f"a.{ext}"), spec)
        assert split.text == ["good", "bad"] and split.label.tolist() == [1, 0], ext


def test_bad_files_get_clear_errors(tmp_path):
    spec = PRESETS["mrpc"]
    (tmp_path / "cols.jsonl").write_text('{"text": "a", "label": 1}\n')
    with pytest.raises(DataError, match=r"lacks column\(s\) \['text_pair'\]"):
        read_split_file(str(tmp_path / "cols.jsonl"), spec)
    (tmp_path / "range.jsonl").write_text('{"text": "a", "text_pair": "b", "label": 2}\n')
    with pytest.raises(DataError, match="label 2 is out of range for 2 classes"):
        read_split_file(str(tmp_path / "range.jsonl"), spec)
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(DataError, match="Unsupported data file"):
        read_split_file(str(tmp_path / "x.xml"), spec)
    with pytest.raises(DataError, match="does not exist"):
        read_split_file(str(tmp_path / "missing.jsonl"), spec)


def test_custom_task_from_own_files(tmp_path):
    for name in ("train", "dev", "test"):
        (tmp_path / f"{name}.jsonl").write_text(
            "\n".join(json.dumps({"text": f"t{i}", "label": ["spam", "ham"][i % 2]}) for i in range(4)))
    config = TaskConfig(name="spam", labels=("spam", "ham"), verbalizer=("bad", "good"),
                        template="{prompt} {text} It was {mask}", train_file=str(tmp_path / "train.jsonl"),
                        dev_file=str(tmp_path / "dev.jsonl"), test_file=str(tmp_path / "test.jsonl"))
    data = load_task(config, seed=1)
    assert len(data.train) == 4 and data.train.label.tolist() == [0, 1, 0, 1]


def test_custom_task_from_a_bbt_layout_data_root(tmp_path, monkeypatch):
    split = tmp_path / "spam" / "16-shot" / "7"
    split.mkdir(parents=True)
    for name, folder in (("train", split), ("dev", split), ("test", tmp_path / "spam")):
        (folder / f"{name}.jsonl").write_text(
            "\n".join(json.dumps({"text": f"{name}{i}", "label": i % 2}) for i in range(6)))
    custom = dict(name="spam", labels=("spam", "ham"), verbalizer=("bad", "good"),
                  template="{prompt} {text} It was {mask}")
    data = load_task(TaskConfig(**custom, data_dir=str(tmp_path)), seed=7)  # as --data-dir DIR
    assert data.train.text[0] == "train0" and len(data.test) == 6 and "split seed 7" in data.source
    monkeypatch.setenv("GDFO_DATA_DIR", str(tmp_path))  # or the environment's data root
    assert load_task(TaskConfig(**custom), seed=7).dev.text[0] == "dev0"
    monkeypatch.delenv("GDFO_DATA_DIR")
    with pytest.raises(ConfigError, match=r"needs its data: .*--data-dir"):
        load_task(TaskConfig(**custom), seed=7)


def test_k_shot_sampling_is_disjoint_balanced_and_seeded():
    labels = np.repeat([0, 1, 2], 50)
    train, dev = sample_k_shot(labels, 16, seed=3, n_classes=3)
    assert not set(train) & set(dev)
    assert np.bincount(labels[train]).tolist() == [16, 16, 16] == np.bincount(labels[dev]).tolist()
    assert np.array_equal(train, sample_k_shot(labels, 16, seed=3, n_classes=3)[0])
    with pytest.raises(DataError, match="fewer than 2 x 16"):
        sample_k_shot(np.repeat([0, 1], 20), 16, 0, 2)


def test_missing_seed_lists_available(tiny_data_dir):
    with pytest.raises(DataError, match=r"available seeds: \['42'\]"):
        load_task(TaskConfig(name="sst2", data_dir=tiny_data_dir), seed=7)


@pytest.mark.skipif(not SHARED, reason="set GDFO_DATA_DIR to the benchmark data")
@pytest.mark.parametrize("task", sorted(PRESETS))
def test_every_preset_loads_from_the_benchmark_data(task):
    seed = 13
    data = load_task(TaskConfig(name=task, max_test_examples=50), seed=seed)
    n = data.spec.n_classes
    assert len(data.train) == 16 * n == len(data.dev)
    assert np.bincount(data.train.label, minlength=n).tolist() == [16] * n
    assert len(data.test) == 50
    assert (data.train.text_pair is not None) == data.spec.pair


def test_hub_loading_samples_k_per_class_from_train(monkeypatch):
    """The Hub path with a stand-in for ``datasets.load_dataset`` (no network in tests)."""
    import sys
    import types

    rows = [{"sentence": f"s{i}", "label": i % 2} for i in range(100)] + [{"sentence": "x", "label": -1}]
    fake = types.ModuleType("datasets")
    calls = []
    fake.load_dataset = lambda name, subset: calls.append((name, subset)) or {"train": rows, "validation": rows[:10]}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.delenv("GDFO_DATA_DIR", raising=False)
    data = load_task(TaskConfig(name="sst2", shots=4), seed=5)
    assert calls == [("glue", "sst2")]
    assert np.bincount(data.train.label).tolist() == [4, 4] == np.bincount(data.dev.label).tolist()
    assert not set(data.train.text) & set(data.dev.text) and len(data.test) == 10


def test_hub_failure_says_what_to_do_instead(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("datasets")

    def offline(name, subset):
        raise ConnectionError("no network")
    fake.load_dataset = offline
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.delenv("GDFO_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="Offline, pass --data-dir"):
        load_task(TaskConfig(name="rte"), seed=1)


def test_hub_sampling_on_a_local_dataset_in_the_hubs_format(tmp_path, monkeypatch):
    """The real ``datasets`` package (installed by ``make setup``) reading a folder as the Hub would serve it."""
    pytest.importorskip("datasets")
    for key in ("HF_HOME", "HF_DATASETS_CACHE"):
        monkeypatch.setenv(key, str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("GDFO_DATA_DIR", raising=False)
    hub = tmp_path / "glue_sst2"
    hub.mkdir()
    train = [{"sentence": f"sentence {i}", "label": i % 2, "idx": i} for i in range(60)]
    (hub / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train))
    (hub / "validation.jsonl").write_text("\n".join(json.dumps({**r, "idx": 100 + i}) for i, r in enumerate(train[:9])))
    data = load_task(TaskConfig(name="sst2", hf_dataset=str(hub), shots=4), seed=5)
    assert np.bincount(data.train.label).tolist() == [4, 4] == np.bincount(data.dev.label).tolist()
    assert not set(data.train.text) & set(data.dev.text) and len(data.test) == 9
    again = load_task(TaskConfig(name="sst2", hf_dataset=str(hub), shots=4), seed=5)
    assert again.train.text == data.train.text  # BBT's sampling is a function of the split seed
    assert load_task(TaskConfig(name="sst2", hf_dataset=str(hub), shots=4), seed=6).train.text != data.train.text


def test_the_default_split_ships_with_the_package(monkeypatch):
    monkeypatch.delenv("GDFO_DATA_DIR", raising=False)
    data = load_task(TaskConfig(name="sst2"), seed=42)
    assert (len(data.train), len(data.dev), len(data.test)) == (32, 32, 872)
    assert "package's own copy" in data.source
    assert np.bincount(data.train.label).tolist() == [16, 16]
