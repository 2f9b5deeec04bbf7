"""Rendering a template for every example and tokenizing it around the prompt slot."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gdfo_ray.exceptions import ConfigError
from gdfo_ray.tasks import Split


@dataclass
class EncodedSplit:
    """Token ids of every example, split around the prompt slot."""

    before: list  # ids before the prompt (special tokens included)
    after: list  # ids after the prompt
    slot: np.ndarray  # index of the label slot inside ``after``


def encode_split(tokenizer, template: str, kind: str, split: Split, max_text_tokens: int) -> EncodedSplit:
    """Render the template for every example and tokenize it around ``{prompt}``."""
    mask_token = tokenizer.mask_token
    if kind == "causal_lm":
        head, _, tail = template.partition("{mask}")
        if tail.strip():
            raise ConfigError(
                f"For a causal LM the label slot {{mask}} must end the template, but {template!r} has "
                f"{tail!r} after it. Put the text before the slot (task.template)."
            )
        template = head.rstrip()
    elif mask_token is None:
        raise ConfigError(f"The tokenizer has no mask token, so template {template!r} cannot mark the slot.")
    else:
        template = template.replace("{mask}", mask_token)
    pre, _, post = template.partition("{prompt}")
    bos = [tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else []
    if kind == "causal_lm":
        bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []
    eos = [tokenizer.sep_token_id] if kind != "causal_lm" and tokenizer.sep_token_id is not None else []
    mask_id = tokenizer.mask_token_id
    before, after, slots = [], [], []
    pairs = split.text_pair if split.text_pair is not None else [None] * len(split)
    for text, pair in zip(split.text, pairs):
        values = {"text": _truncate(tokenizer, text, max_text_tokens)}
        if pair is not None:
            values["text_pair"] = _truncate(tokenizer, pair, max_text_tokens)
        b = bos + (tokenizer.encode(_fill(pre, values).rstrip(), add_special_tokens=False) if pre.strip() else [])
        # After text, the words that follow the prompt keep their leading space, as in the running text.
        lead = " " if pre.strip() else ""
        a = tokenizer.encode(lead + _fill(post, values).strip(), add_special_tokens=False) + eos
        if kind == "causal_lm":
            slot = len(a) - 1
        else:
            where = [i for i, t in enumerate(a) if t == mask_id]
            if len(where) != 1:
                raise ConfigError(f"Template {template!r} must put the mask after {{prompt}}, exactly once.")
            slot = where[0]
        before.append(b)
        after.append(a)
        slots.append(slot)
    return EncodedSplit(before, after, np.asarray(slots))


def _fill(text: str, values: dict) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def _truncate(tokenizer, text: str, max_tokens: int) -> str:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])
