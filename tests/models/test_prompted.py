"""The prompted LM (gdfo_ray/models/prompted.py): prompts in, C scores out, equal to the plain model's."""

import numpy as np
import pytest
import torch

from gdfo_ray.models import build_prompted_lm
from gdfo_ray.tasks import PRESETS, Split


def _split():
    return Split(["the movie was good", "it was very bad", "the plot was fun and the acting was great"], None,
                 np.array([1, 0, 1]))


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


# Every speed-up must return the plain path's logits. Tolerances: float32 paths 1e-5 absolute;
# bfloat16 weights 0.05 absolute on these logits (|logit| < 1).
def _plain_hf_logits(lm, prompts: torch.Tensor, rows) -> torch.Tensor:
    """The reference: the whole model, one row at a time, full vocabulary head, no cache, no padding."""
    enc, n, out = lm.encoded["train"], prompts.shape[1], []
    for p, r in zip(prompts, rows):
        seq = torch.as_tensor(enc.before[r] + [lm.pad_id] * n + enc.after[r])[None]
        embeds = lm.embeddings(seq).clone()
        embeds[0, len(enc.before[r]): len(enc.before[r]) + n] = p
        logits = lm.model(inputs_embeds=embeds).logits[0, len(enc.before[r]) + n + enc.slot[r]]
        out.append(logits[lm.verbalizer_ids])
    return torch.stack(out)


def _suffix_lm(path, dtype="float32", max_rows=256):
    import dataclasses

    from gdfo_ray.tasks import move_prompt_after_text

    spec = dataclasses.replace(PRESETS["sst2"], template_clm=move_prompt_after_text(PRESETS["sst2"].template_clm))
    return build_prompted_lm(path, "auto", spec, {"train": _split()}, readout="verbalizer", dtype=dtype, device="cpu",
                             max_text_tokens=16, max_rows_per_forward=max_rows, need_lm_head=True)


@pytest.mark.parametrize("which", ["causal", "masked"])
def test_verbalizer_readout_at_the_slot_equals_the_full_model(tiny_models, which):
    lm = _lm(tiny_models[which])
    prompts, rows = torch.randn(4, 3, lm.hidden_size) * 0.5, np.array([0, 1, 2, 1])
    with torch.no_grad():
        torch.testing.assert_close(lm(prompts, rows, "train"), _plain_hf_logits(lm, prompts, rows),
                                   rtol=0, atol=1e-5)


def test_cached_text_states_with_the_prompt_after_the_text_equal_the_full_model(tiny_models):
    lm = _suffix_lm(tiny_models["causal"], max_rows=3)
    assert lm.template.startswith("{text} {prompt}")
    prompts, rows = torch.randn(6, 3, lm.hidden_size) * 0.5, np.array([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        plain = _plain_hf_logits(lm, prompts, rows)
        lm.cache_prefixes(["train"])
        cached = lm(prompts, rows, "train")
        empty = lm(torch.zeros(2, 0, lm.hidden_size), rows[:2], "train")  # the manual prompt: no tokens
    assert "train" in lm._prefix_kv  # the cached path ran
    torch.testing.assert_close(cached, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(empty, _plain_hf_logits(lm, torch.zeros(2, 0, lm.hidden_size), rows[:2]),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["causal", "masked", "suffix"])
def test_rows_sharing_a_prompt_score_as_the_full_model(tiny_models, which, monkeypatch):
    from gdfo_ray.models.prompted import PromptedLM

    lm = _suffix_lm(tiny_models["causal"], max_rows=4) if which == "suffix" else _lm(tiny_models[which], max_rows=4)
    if which == "suffix":
        lm.cache_prefixes(["train"])
    computed = []
    original = PromptedLM._compute_prompt_kv
    monkeypatch.setattr(PromptedLM, "_compute_prompt_kv", lambda self, *a: computed.append(1) or original(self, *a))
    prompts = torch.randn(3, 2, lm.hidden_size) * 0.5
    owner, rows = np.repeat([0, 1, 2], 3), np.tile([0, 1, 2], 3)
    with torch.no_grad():
        shared = lm.forward_shared(prompts, owner, rows, "train")
        plain = _plain_hf_logits(lm, prompts[torch.as_tensor(owner)], rows)
    torch.testing.assert_close(shared, plain, rtol=0, atol=1e-5)
    # The prompt's states are computed once per call only where the rows of a prompt share the text before it.
    assert computed == ([1] if which == "causal" else [])


def test_bfloat16_weights_stay_within_the_stated_tolerance(tiny_models):
    full, half = _suffix_lm(tiny_models["causal"]), _suffix_lm(tiny_models["causal"], dtype="bfloat16")
    half.cache_prefixes(["train"])
    prompts, rows = torch.randn(6, 3, full.hidden_size) * 0.5, np.array([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        a, b = full(prompts, rows, "train"), half(prompts, rows, "train")
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, a, rtol=0, atol=0.05)


def test_bfloat16_student_arithmetic_stays_within_the_stated_tolerance(tiny_config):
    from gdfo_ray.student import StudentTrainer
    from gdfo_ray.tasks import load_task

    config = tiny_config()
    data = load_task(config.task, config.seed)
    full = StudentTrainer(config, data)
    half = StudentTrainer(tiny_config(**{"student.precision": "bfloat16"}), data)
    assert half.model.autocast and not full.model.autocast
    z = np.random.default_rng(0).normal(size=config.prompt.intrinsic_dim)
    rows = np.arange(len(data.train))
    np.testing.assert_allclose(half.predict(z, "train", rows), full.predict(z, "train", rows), atol=0.05)
    _, g_full = full.grad_z(z)
    _, g_half = half.grad_z(z)
    np.testing.assert_allclose(g_half, g_full, rtol=1e-5, atol=1e-7)  # gradients always in float32
    # By default both read the train texts apart from the prompt, from states cached once (student.text_cache).
    assert full.model.lm._prefix_kv.get("train") is not None and half.model.lm._prefix_kv.get("train") is not None


def _separate_text_reference(lm, prompts: torch.Tensor, rows) -> torch.Tensor:
    """The reference of ``separate_text``: the whole encoder, one row at a time, no cache, with a mask that
    lets the text tokens (before the prompt) attend only to each other."""
    enc, n, out = lm.encoded["train"], prompts.shape[1], []
    for p, r in zip(prompts, rows):
        nb = len(enc.before[r])
        seq = torch.as_tensor(enc.before[r] + [lm.pad_id] * n + enc.after[r])[None]
        embeds = lm.embeddings(seq).clone()
        embeds[0, nb: nb + n] = p
        length = seq.shape[1]
        allowed = torch.ones(length, length, dtype=torch.bool)
        allowed[:nb, nb:] = False
        hidden = lm.model.base_model(inputs_embeds=embeds, attention_mask=allowed[None, None]).last_hidden_state
        out.append(lm.head(hidden[0, nb + n + enc.slot[r]]))
    return torch.stack(out)


def test_an_encoder_reading_the_text_apart_from_the_prompt_equals_its_masked_full_model(tiny_models):
    torch.manual_seed(0)
    # Two layers (the tiny masked LM's body, read by a linear head): in one, no token's output reaches the slot.
    kwargs = dict(readout="linear", dtype="float32", device="cpu", max_text_tokens=16, need_lm_head=False)
    lm = build_prompted_lm(tiny_models["masked"], "auto", PRESETS["ag_news"], {"train": _split(), "dev": _split()},
                           max_rows_per_forward=3, separate_text=True, **kwargs)
    assert lm.template == ". News: {text} {prompt} {mask}"  # the text first, the slot after the prompt
    with torch.no_grad():  # weights large enough that attention is far from uniform: the masks then matter
        for p in lm.model.parameters():
            p.normal_(0, 0.3)
    lm.cache_prefixes(["train"])
    prompts, rows = torch.randn(6, 3, lm.hidden_size) * 0.5, np.array([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        reference = _separate_text_reference(lm, prompts, rows)
        cached = lm(prompts, rows, "train")
        uncached = lm(prompts, rows, "dev")  # the same examples, their text states computed per chunk
    assert lm._prefix_kv.get("train") is not None and "dev" not in lm._prefix_kv
    torch.testing.assert_close(cached, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(uncached, reference, rtol=0, atol=1e-5)
    # A different model from the plain encoder, whose text tokens see the prompt.
    plain = build_prompted_lm(tiny_models["masked"], "auto", PRESETS["ag_news"], {"train": _split()},
                              max_rows_per_forward=3, **kwargs)
    plain.load_state_dict(lm.state_dict())
    plain.encoded["train"] = lm.encoded["train"]
    with torch.no_grad():
        gap = (plain(prompts, rows, "train") - cached).abs().max()
    assert gap > 1e-3  # a hundred times the tolerance the equalities above hold to
    # The prompt still receives a gradient through the cached path.
    prompts.requires_grad_(True)
    lm(prompts, rows, "train").sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0


def test_a_student_with_a_trained_body_caches_no_text_states(tiny_config, tiny_models):
    from gdfo_ray.student import StudentTrainer
    from gdfo_ray.tasks import load_task

    # A causal-LM student with the prompt after the text: the one kind whose text states could be cached
    # without student.text_cache, and must not be, since its body changes with every step.
    config = tiny_config(**{"model.student": tiny_models["causal"], "task.prompt_placement": "suffix",
                            "student.text_cache": False, "student.train_body": True})
    data = load_task(config.task, config.seed)
    trainer = StudentTrainer(config, data)
    trainer.predict(np.zeros(config.prompt.intrinsic_dim), "train", np.arange(len(data.train)))
    assert not trainer.model.lm.cached_splits and not trainer.model.lm._prefix_kv


def test_forwards_of_similar_lengths_stay_within_their_token_budget():
    from gdfo_ray.models.prompted import length_chunks

    lengths = [30, 5, 12, 5, 30, 7, 12, 50]
    chunks = length_chunks(lengths, max_rows=3, max_tokens=40)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    for chunk in chunks:
        longest = max(lengths[i] for i in chunk)
        assert len(chunk) <= 3 and (len(chunk) == 1 or len(chunk) * longest <= 40)
    # Shortest first, and a row longer than the budget still goes, alone.
    assert [lengths[i] for c in chunks for i in c] == sorted(lengths) and list(chunks[-1]) == [7]
    assert [len(c) for c in length_chunks(lengths, max_rows=3, max_tokens=None)] == [3, 3, 2]
