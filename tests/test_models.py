import numpy as np
import pytest
import torch

from gdfo_ray import ConfigError
from gdfo_ray.models import build_prompted_lm, detect_kind, load_lm, verbalizer_token_ids
from gdfo_ray.tasks import PRESETS, Split


def _split():
    return Split(["the movie was good", "it was very bad", "the plot was fun and the acting was great"], None,
                 np.array([1, 0, 1]))


@pytest.mark.parametrize("which, kind", [("causal", "causal_lm"), ("masked", "masked_lm"), ("encoder", "encoder")])
def test_kind_detection(tiny_models, which, kind):
    _, model, detected = load_lm(tiny_models[which], need_lm_head=False)
    assert detected == kind == detect_kind(model.config)


def test_encoder_cannot_be_a_teacher(tiny_models):
    with pytest.raises(ConfigError, match="encoder without an LM head"):
        load_lm(tiny_models["encoder"], need_lm_head=True)


def test_multi_token_verbalizer_is_refused(tiny_models):
    tokenizer, _, _ = load_lm(tiny_models["causal"])
    with pytest.raises(ConfigError, match="'superb' is not a single token"):
        verbalizer_token_ids(tokenizer, ["bad", "superb"], "tiny")


def test_missing_model_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from gdfo_ray import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="not a local path"):
        load_lm("nobody/no-such-model-here")


def _lm(path, readout="verbalizer", max_rows=256):
    return build_prompted_lm(path, "auto", PRESETS["sst2"], {"train": _split()}, readout=readout, dtype="float32",
                             device="cpu", max_text_tokens=16, max_rows_per_forward=max_rows, need_lm_head=False)


@pytest.mark.parametrize("which", ["causal", "masked"])
def test_chunked_bucketed_forward_equals_one_pass(tiny_models, which):
    torch.manual_seed(0)
    one, chunked = _lm(tiny_models[which]), _lm(tiny_models[which], max_rows=2)
    prompts = torch.randn(6, 3, one.hidden_size) * 0.1
    rows = np.array([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        a, b = one(prompts, rows, "train"), chunked(prompts, rows, "train")
    assert a.shape == (6, 2)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Padding must not leak: a row scored alone equals the same row in a padded batch.
    with torch.no_grad():
        alone = one(prompts[:1], rows[:1], "train")
    torch.testing.assert_close(alone[0], a[0], rtol=1e-4, atol=1e-5)


def test_prompt_changes_the_answer_and_empty_prompt_works(tiny_models):
    lm = _lm(tiny_models["causal"])
    rows = np.array([0, 1])
    with torch.no_grad():
        base = lm(torch.zeros(2, 0, lm.hidden_size), rows, "train")
        moved = lm(torch.randn(2, 3, lm.hidden_size), rows, "train")
    assert base.shape == moved.shape == (2, 2)
    assert not torch.allclose(base, moved)


def test_linear_readout_for_encoder_student(tiny_models):
    lm = _lm(tiny_models["encoder"], readout="linear")
    prompts = torch.zeros(3, 2, lm.hidden_size, requires_grad=True)
    out = lm(prompts, np.array([0, 1, 2]), "train")
    out.sum().backward()
    assert out.shape == (3, 2) and prompts.grad is not None and prompts.grad.abs().sum() > 0
