"""Language-model wrappers: load any HF id or path, inject prompt embeddings, read C scores.

:class:`PromptedLM` is shared by the teacher (verbalizer logits at the label slot)
and the student (a linear head on the slot's hidden state when the model has no
LM head). Rows are (prompt, example) pairs, so a whole population x batch goes
through in as few forward passes as ``max_rows_per_forward`` allows, sorted by
length so that padding stays small.

Split by role: ``loading`` (hub, offline packages, GGUF), ``encoding`` (templates to token ids),
``prompted`` (:class:`PromptedLM` and its builder) and ``devices`` (device, threads, dtype).
"""

from gdfo_ray.models.devices import cpu_has_fast_bfloat16, host_tensor, pick_device, resolve_dtype, set_threads
from gdfo_ray.models.encoding import EncodedSplit, encode_split
from gdfo_ray.models.loading import (ALIASES, CACHE_ENV, OFFLINE_PACKAGES, cache_dir, detect_kind, load_lm,
                                     resolve_model_path, verbalizer_token_ids)
from gdfo_ray.models.prompted import READOUTS, DeepPrompts, PromptedLM, build_prompted_lm

__all__ = ["ALIASES", "CACHE_ENV", "OFFLINE_PACKAGES", "READOUTS", "DeepPrompts", "EncodedSplit", "PromptedLM",
           "build_prompted_lm", "cache_dir", "cpu_has_fast_bfloat16", "detect_kind", "encode_split", "host_tensor",
           "load_lm", "pick_device", "resolve_dtype", "resolve_model_path", "set_threads", "verbalizer_token_ids"]
