"""BBTv2: per-layer prompts in the teacher, the per-layer prompt space, and the method's turns."""

import numpy as np
import pytest
import torch

from gdfo_ray import ConfigError, run
from gdfo_ray.config import PromptConfig
from gdfo_ray.teachers.local import LocalTeacher
from gdfo_ray.models import DeepPrompts, build_prompted_lm
from gdfo_ray.prompt import DeepPromptSpace, PromptSpaceSpec, load_prompt, make_space, save_prompt
from gdfo_ray.tasks import PRESETS, Split, load_task
from gdfo_ray.teachers import TeacherInfo


def _split():
    return Split(["the movie was good", "it was very bad", "the plot was fun and the acting was great"], None,
                 np.array([1, 0, 1]))


def _lm(path, placement="prefix", max_rows=256):
    spec = PRESETS["sst2"]
    if placement == "suffix":
        from dataclasses import replace

        spec = replace(spec, template_clm="{text} {prompt} It was {mask}")
    return build_prompted_lm(path, "auto", spec, {"train": _split()}, readout="verbalizer", dtype="float32",
                             device="cpu", max_text_tokens=16, max_rows_per_forward=max_rows, need_lm_head=True)


def _deep(lm, values, k_rows):
    return DeepPrompts(values, torch.arange(values.shape[0]).repeat_interleave(k_rows))


@pytest.mark.parametrize("which", ["causal", "masked"])
def test_zero_deep_prompts_change_nothing_and_hooks_are_removed(tiny_models, which):
    lm = _lm(tiny_models[which])
    torch.manual_seed(0)
    n_layers = len(lm.transformer_layers())
    prompts, rows = torch.randn(2, 3, lm.hidden_size) * 0.5, np.array([0, 1, 2, 0, 1, 2])
    p = prompts.repeat_interleave(3, dim=0)
    with torch.no_grad():
        plain = lm(p, rows, "train")
        zero = lm(p, rows, "train", deep=_deep(lm, torch.zeros(2, n_layers - 1, 3, lm.hidden_size), 3))
        deep = lm(p, rows, "train", deep=_deep(lm, 10 * torch.randn(2, n_layers - 1, 3, lm.hidden_size), 3))
        after = lm(p, rows, "train")
    torch.testing.assert_close(zero, plain, rtol=0, atol=1e-6)
    assert (deep - plain).abs().max() > 1e-3  # a layer-1 prompt reaches the readout
    torch.testing.assert_close(after, plain, rtol=0, atol=0)  # no hook left behind


def test_deep_prompt_is_added_where_the_prompt_tokens_enter_the_layer(tiny_models):
    """Reference: the same addition done by hand with a hook on layer 1's input, on one row."""
    lm = _lm(tiny_models["causal"])
    torch.manual_seed(1)
    prompt, extra = torch.randn(1, 3, lm.hidden_size) * 0.5, torch.randn(1, 1, 3, lm.hidden_size)
    rows = np.array([2])
    start = len(lm.encoded["train"].before[2])

    def by_hand(module, args, kwargs):
        h = args[0].clone()
        h[0, start:start + 3] += extra[0, 0]
        return (h, *args[1:]), kwargs

    with torch.no_grad():
        ours = lm(prompt, rows, "train", deep=_deep(lm, extra, 1))
        handle = lm.transformer_layers()[1].register_forward_pre_hook(by_hand, with_kwargs=True)
        try:
            expected = lm(prompt, rows, "train")
        finally:
            handle.remove()
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_deep_prompts_with_cached_text_states_equal_the_full_forward(tiny_models):
    lm = _lm(tiny_models["causal"], placement="suffix", max_rows=2)
    torch.manual_seed(2)
    prompts = torch.randn(2, 3, lm.hidden_size) * 0.5
    deep_values = torch.randn(2, 1, 3, lm.hidden_size)
    rows, p = np.array([0, 1, 2, 0, 1, 2]), prompts.repeat_interleave(3, dim=0)
    with torch.no_grad():
        full = lm(p, rows, "train", deep=_deep(lm, deep_values, 3))
        lm.cache_prefixes(["train"])
        cached = lm(p, rows, "train", deep=_deep(lm, deep_values, 3))
    assert lm._prefix_kv.get("train") is not None
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


def test_deep_space_projects_per_layer_and_reloads(tmp_path):
    spec = PromptSpaceSpec(4, 2, 3, 1.0, 0.5, "zeros", 7, ())
    space = DeepPromptSpace(spec, (0.5, 2.0, 4.0))
    assert space.dim == 12
    z = np.zeros((1, 12))
    z[0, 4:8] = 1.0  # layer 1 only
    P = space.project(z)
    assert P.shape == (1, 3, 2, 3)
    assert np.allclose(P[0, 0], 0) and np.allclose(P[0, 2], 0) and not np.allclose(P[0, 1], 0)
    # Each layer's projection is on the scale of that layer's hidden states.
    assert np.std(space.A_deep[1]) / np.std(space.A_deep[0]) == pytest.approx(2.0, rel=0.35)
    with pytest.raises(ValueError, match="3 layers x d=4 need 12"):
        space.project(np.zeros((1, 4)))
    save_prompt(str(tmp_path / "p.json"), z[0], space, {"task": "sst2"})
    z2, space2, meta = load_prompt(str(tmp_path / "p.json"))
    assert isinstance(space2, DeepPromptSpace) and space2.fingerprint() == space.fingerprint()
    np.testing.assert_array_equal(space2.project(z2), P)


def test_bbtv2_needs_a_teacher_that_takes_per_layer_prompts():
    info = TeacherInfo("https://api.example/v1", 8, 0.1, 100, 2)  # a service: no layer_std
    with pytest.raises(ConfigError, match="per-layer prompts"):
        make_space("bbtv2", PromptConfig(intrinsic_dim=4, n_prompt_tokens=2, init="zeros"), 0, info, None)
    deep_info = TeacherInfo("local", 8, 0.1, 100, 2, layer_std=(0.1, 1.0))
    with pytest.raises(ConfigError, match="deep_layers=3, but the teacher 'local' has 2 layers"):
        make_space("bbtv2", PromptConfig(intrinsic_dim=4, n_prompt_tokens=2, init="zeros", deep_layers=3), 0,
                   deep_info, None)
    assert make_space("bbtv2", PromptConfig(intrinsic_dim=4, n_prompt_tokens=2, init="zeros"), 0, deep_info,
                      None).n_layers == 2


def test_local_teacher_takes_four_dimensional_prompts(tiny_config):
    config = tiny_config(method="bbtv2")
    data = load_task(config.task, config.seed)
    teacher = LocalTeacher(config, data)
    info = teacher.describe()
    assert len(info.layer_std) == 2 and all(s > 0 for s in info.layer_std)
    rng = np.random.default_rng(0)
    shallow = rng.normal(size=(3, 2, info.hidden_size)).astype(np.float32)
    deep = np.zeros((3, 2, 2, info.hidden_size), np.float32)
    deep[:, 0] = shallow
    ids = np.arange(len(data.train))
    np.testing.assert_allclose(teacher.query(deep, "train", ids), teacher.query(shallow, "train", ids), atol=1e-6)


def test_bbtv2_searches_the_layers_in_turns_within_the_budget(tiny_config):
    config = tiny_config(method="bbtv2")
    result = run(config, progress=None)
    layers = [row["layer"] for row in result.history]
    assert layers == [0, 1, 0, 1, 0, 1]  # 24 calls / popsize 4, two layers of the tiny Llama
    assert result.summary["calls"] == config.search.budget_calls
    assert len(result.best_z) == 2 * config.prompt.intrinsic_dim
    # The prompt the turns share never gets worse on the train batch.
    best = [row["fitness_best"] for row in result.history]
    assert best == sorted(best, reverse=True)
    z, space, _ = load_prompt(f"{result.output_dir}/best_prompt.json")
    assert isinstance(space, DeepPromptSpace) and space.n_layers == 2
