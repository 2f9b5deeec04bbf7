"""Loading a model by HF id or path (gdfo_ray/models/loading.py): its kind, its verbalizer, a clear error offline."""

import pytest

from gdfo_ray import ConfigError
from gdfo_ray.models import detect_kind, load_lm, verbalizer_token_ids


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
