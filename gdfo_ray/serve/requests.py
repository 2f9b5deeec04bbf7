"""What a request may hold: its body read as JSON with every limit, and a ``/v1/score`` body checked field by field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from gdfo_ray.serve.settings import ServeConfig
from gdfo_ray.wire import WireError, decode_array

_SCORE_FIELDS = {"template", "verbalizer", "prompt", "inputs", "max_text_tokens"}


@dataclass
class ScoreRequest:
    template: str
    verbalizer: tuple
    prompt: np.ndarray  # (n, h) float32
    texts: list
    pairs: Optional[list]
    max_text_tokens: int

    @property
    def rows(self) -> int:
        return len(self.texts)


def check_unicode(value: str, name: str) -> str:
    """A JSON string may carry a lone surrogate (``"\\ud800"``), which no tokenizer can encode: refuse it here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise WireError(f"{name} is not valid Unicode text (it holds a lone surrogate).") from None
    return value


def parse_score_request(body: Any, config: ServeConfig, hidden_size: int) -> ScoreRequest:
    """Check every field of a ``/v1/score`` body; raises :class:`WireError` naming the first bad one."""
    if not isinstance(body, dict):
        raise WireError("The body must be a JSON object.")
    unknown = set(body) - _SCORE_FIELDS
    if unknown:
        raise WireError(f"Unknown fields {sorted(unknown)}; allowed: {sorted(_SCORE_FIELDS)}.")
    missing = {"template", "verbalizer", "prompt", "inputs"} - set(body)
    if missing:
        raise WireError(f"Missing fields {sorted(missing)}.")
    template = body["template"]
    if not isinstance(template, str) or not 0 < len(template) <= 1000:
        raise WireError("template must be a string of 1 to 1000 characters.")
    check_unicode(template, "template")
    verbalizer = body["verbalizer"]
    if (not isinstance(verbalizer, list) or not 2 <= len(verbalizer) <= config.max_classes
            or not all(isinstance(w, str) and 0 < len(w) <= 50 for w in verbalizer)):
        raise WireError(f"verbalizer must be a list of 2 to {config.max_classes} words (strings of 1 to 50 "
                        "characters).")
    for i, word in enumerate(verbalizer):
        check_unicode(word, f"verbalizer[{i}]")
    shape = body["prompt"].get("shape") if isinstance(body["prompt"], dict) else None
    if isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) for s in shape):
        if shape[1] != hidden_size:
            raise WireError(f"prompt must have shape (n, {hidden_size}) for this model, but got {shape}.")
        if shape[0] > config.max_prompt_tokens:
            raise WireError(f"prompt has {shape[0]} tokens; the limit is {config.max_prompt_tokens}.")
    prompt = decode_array(body["prompt"], "prompt", ndim=2, max_elements=config.max_prompt_tokens * hidden_size)
    inputs = body["inputs"]
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= config.max_inputs:
        raise WireError(f"inputs must be a list of 1 to {config.max_inputs} objects.")
    pair = isinstance(inputs[0], dict) and "text_pair" in inputs[0]
    texts, pairs = [], [] if pair else None
    for i, item in enumerate(inputs):
        keys = {"text", "text_pair"} if pair else {"text"}
        if not isinstance(item, dict) or set(item) != keys:
            raise WireError(f"inputs[{i}] must be an object with exactly the fields {sorted(keys)} (every input "
                            "of a request has the same fields).")
        for key in sorted(keys):
            value = item[key]
            if not isinstance(value, str) or len(value) > config.max_text_chars:
                raise WireError(f"inputs[{i}].{key} must be a string of at most {config.max_text_chars} characters.")
            check_unicode(value, f"inputs[{i}].{key}")
        texts.append(item["text"])
        if pair:
            pairs.append(item["text_pair"])
    max_tokens = body.get("max_text_tokens", config.max_text_tokens)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= config.max_text_tokens:
        raise WireError(f"max_text_tokens must be an integer from 1 to {config.max_text_tokens}.")
    from gdfo_ray.tasks import validate_template

    validate_template(template, pair)
    return ScoreRequest(template, tuple(verbalizer), prompt, texts, pairs, max_tokens)


def _count_json_values(raw: bytes, limit: int) -> int:
    """Objects, arrays and members in a JSON text, outside its strings; stops counting past ``limit``.

    The raw counts of ``{``, ``[`` and ``,`` bound it from above and cost one pass in C; only a
    body whose raw count is over the limit has its strings stripped, to tell text from structure.
    """
    raw_count = raw.count(b"{") + raw.count(b"[") + raw.count(b",")
    if raw_count <= limit:
        return raw_count
    import re

    structure = re.sub(rb'"(?:[^"\\]|\\.)*"', b"", raw)
    return structure.count(b"{") + structure.count(b"[") + structure.count(b",")


def parse_json(raw: bytes, limit: int) -> Any:
    """A request body as JSON, refused before parsing if it holds more than ``limit`` values."""
    import json

    if _count_json_values(raw, limit) > limit:
        raise Refused(413, f"The body holds more than {limit} JSON values; no valid request needs that many.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WireError(f"The body is not UTF-8 text (byte {e.start}).") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise WireError("The body is nested too deeply to be a request.") from None
    except ValueError as e:
        raise WireError(f"The body is not valid JSON: {e}.") from None


class Refused(Exception):
    """A request refused with ``status`` and ``message`` (not a 400)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message
