"""Shared fixtures: tiny random models built from configs, and a tiny BBT-layout task."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import pytest

WORDS = ("the movie was good bad great fine awful plot acting story fun dull it a an and but not very "
         "is so film one news sports world business tech yes no maybe question answer was about this").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + sorted(set(WORDS)) + [".", "?", ",", ":", "[", "]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", mask_token="[MASK]",
                                   cls_token="[CLS]", sep_token="[SEP]", bos_token="[BOS]")


RAY_ENV = ("RAY_TMPDIR", "RAY_ADDRESS")


@pytest.fixture(scope="session", autouse=True)
def machine_ray_env():
    """Keep every Ray instance of the test session off the machine's Ray registry.

    ``ray.cluster_utils.Cluster`` records its head in ``<ray temp dir>/ray_current_cluster``, the
    file a plain ``ray.init()`` anywhere on the machine joins, and deletes that file at shutdown
    even when it named someone else's cluster. A private ``RAY_TMPDIR`` keeps both effects inside
    the session, and dropping ``RAY_ADDRESS`` keeps the tests off a cluster the user runs. Yields
    the variables as they were, for tests that act as a process outside the session.
    """
    before = {k: os.environ.get(k) for k in RAY_ENV}
    # Short: Ray's socket paths live under this directory and must fit in 107 bytes.
    private = tempfile.mkdtemp(prefix="gdfo-t-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = private
    os.environ.pop("RAY_ADDRESS", None)
    try:
        yield before
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(private, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of a tiny causal LM, masked LM and encoder sharing one word-level tokenizer."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(0)
    built = {
        "causal": LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=128, pad_token_id=0)),
        "masked": BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             max_position_embeddings=128)),
        "encoder": BertModel(BertConfig(vocab_size=vocab, hidden_size=24, intermediate_size=48,
                                        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=128)),
    }
    paths = {}
    for name, model in built.items():
        path = str(root / name)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths


def _rows(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        word = ["bad", "awful", "dull"][i % 3] if label == 0 else ["good", "great", "fun"][i % 3]
        filler = rng.choice(["the movie", "the plot", "the acting", "the story", "it"])
        rows.append({"text": f"{filler} was very {word}", "label": label})
    return rows


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A BBT-layout data root with an sst2-shaped task (4 per class in train and dev)."""
    root = tmp_path_factory.mktemp("data")
    seed_dir = root / "sst2" / "16-shot" / "42"
    seed_dir.mkdir(parents=True)
    for name, rows in (("train", _rows(8, 1)), ("dev", _rows(8, 2))):
        (seed_dir / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "sst2" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in _rows(12, 3)))
    return str(root)


@pytest.fixture
def tiny_config(tiny_models, tiny_data_dir, tmp_path):
    """A GDFO config on tiny models, in-process, finishing in seconds."""
    from gdfo_ray import GDFOConfig

    def build(**overrides):
        data = {
            "method": "gdfo", "seed": 42, "output_dir": str(tmp_path / "run"),
            "task": {"name": "sst2", "data_dir": tiny_data_dir},
            # float32 pinned: "auto" would pick bfloat16 on CPUs with AMX, and tolerances would follow the runner.
            "model": {"teacher": tiny_models["causal"], "student": tiny_models["encoder"], "dtype": "float32"},
            "prompt": {"intrinsic_dim": 8, "n_prompt_tokens": 2},
            "search": {"budget_calls": 24, "popsize": 4, "eval_every_calls": 8},
            "student": {"k_steps": 2, "batch_rows": 8, "precision": "float32"},
            "pool": {"backend": "local", "torch_threads": 1},
        }
        config = GDFOConfig.from_dict(data)
        return config.with_overrides(overrides) if overrides else config

    return build



class RunCrashed(Exception):
    """A run killed on purpose after some generations (the ``crash_after`` fixture)."""


@pytest.fixture
def crash_after(monkeypatch):
    """``crash_after(n)``: the next run raises ``crash_after.error`` (:class:`RunCrashed`) once generation n
    is checkpointed; ``crash_after(None)`` lets runs go on again."""
    import gdfo_ray.api as api

    real = api._write_history

    def arm(n):
        def write(out, history, config):
            real(out, history, config)
            if len(history) == n:
                raise RunCrashed()
        monkeypatch.setattr(api, "_write_history", real if n is None else write)

    arm.error = RunCrashed
    return arm


SERVICE_TOKEN = "test-token-123"


@pytest.fixture(scope="module")
def tiny_service(tiny_models):
    """``gdfo serve`` on the tiny causal LM, with small limits (16 inputs, 8 prompt tokens, 50 KB bodies)."""
    from gdfo_ray.serve import ServeConfig, start_in_thread

    with start_in_thread(ServeConfig(model=tiny_models["causal"], port=0, token=SERVICE_TOKEN, threads=1,
                                     dtype="float32", max_inputs=16, max_text_chars=200, max_prompt_tokens=8,
                                     max_body_mb=0.05)) as handle:
        yield handle


@pytest.fixture(scope="module")
def local_ray():
    """A small local Ray per module (a module with a multi-node cluster starts its own)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process with the suite's verdict once pytest has reported it.

    After every test has passed and the summary is printed, the interpreter's own teardown
    crashed twice with SIGSEGV (exit 139) in a thread jumping into freed memory, which the
    kernel log places among gRPC's (Ray's) objects: native threads outliving the modules
    that own them. The verdict is the tests', so the process ends here with it, before that
    teardown; any crash during the tests still fails the run.
    """
    status = getattr(config, "_gdfo_exitstatus", None)
    if status is None or os.environ.get("GDFO_TEST_NATIVE_EXIT"):
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(status))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    session.config._gdfo_exitstatus = exitstatus
