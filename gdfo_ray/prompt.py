"""The intrinsic prompt space P(z) = P0 + A z (docs/method.md, Objects), seeded and reproducible."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np

from gdfo_ray.config import PromptConfig
from gdfo_ray.exceptions import ConfigError


@dataclass(frozen=True)
class PromptSpaceSpec:
    """Everything needed to rebuild A and P0 exactly: the config, seed and the model's statistics."""

    intrinsic_dim: int
    n_prompt_tokens: int
    hidden_size: int
    alpha: float
    embedding_std: float
    init: str
    seed: int
    p0_token_ids: tuple


class PromptSpace:
    """Maps z (d,) to prompt embeddings (n, h); the user side owns it, never the black box.

    Example:
        >>> spec = PromptSpaceSpec(4, 2, 3, 1.0, 0.5, "zeros", 0, ())
        >>> PromptSpace(spec).project(np.zeros((1, 4))).shape
        (1, 2, 3)
    """

    def __init__(self, spec: PromptSpaceSpec, p0: Optional[np.ndarray] = None):
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        std = spec.alpha * spec.embedding_std / np.sqrt(spec.intrinsic_dim)
        self.A = rng.normal(0.0, std, size=(spec.intrinsic_dim, spec.n_prompt_tokens * spec.hidden_size))
        self.A = self.A.astype(np.float32)
        if p0 is None:
            p0 = np.zeros((spec.n_prompt_tokens, spec.hidden_size), dtype=np.float32)
        self.P0 = np.asarray(p0, dtype=np.float32).reshape(spec.n_prompt_tokens, spec.hidden_size)

    @classmethod
    def create(cls, config: PromptConfig, seed: int, hidden_size: int, embedding_std: float, vocab_size: int,
               embed_tokens: Callable[[list], np.ndarray]) -> "PromptSpace":
        """Draw P0's tokens from the vocabulary (``init="vocab"``) and A, both from ``seed``."""
        token_ids: tuple = ()
        p0 = None
        if config.init == "vocab":
            rng = np.random.default_rng([seed, 1])
            low = min(1000, vocab_size // 2)  # skip the special and byte tokens at the start of most vocabularies
            token_ids = tuple(int(t) for t in rng.integers(low, vocab_size, size=config.n_prompt_tokens))
            p0 = embed_tokens(list(token_ids))
        spec = PromptSpaceSpec(config.intrinsic_dim, config.n_prompt_tokens, hidden_size, config.alpha,
                               float(embedding_std), config.init, seed, token_ids)
        return cls(spec, p0)

    def project(self, z: np.ndarray) -> np.ndarray:
        """(k, d) -> (k, n, h) prompt embeddings."""
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        flat = self.P0.reshape(1, -1) + z @ self.A
        return flat.reshape(z.shape[0], self.spec.n_prompt_tokens, self.spec.hidden_size)

    def fingerprint(self) -> str:
        """A hash of A and P0, saved with a tuned prompt so a reload can prove it rebuilt the same space."""
        h = hashlib.sha256()
        h.update(self.A.tobytes())
        h.update(self.P0.tobytes())
        return h.hexdigest()[:16]


class DeepPromptSpace:
    """BBTv2's space: one z_l (d each) per layer; z is their concatenation (L * d,).

    Layer 0 is a :class:`PromptSpace` (P0 + A_0 z_0 at the input embeddings). Layer
    l >= 1 maps z_l to A_l z_l, added to the hidden states of the prompt tokens entering
    layer l; A_l's std is ``alpha * std(hidden states entering l) / sqrt(d)``, so every
    layer's prompt is on the scale of what it is added to (BBTv2's normal projection).
    """

    def __init__(self, spec: PromptSpaceSpec, layer_std: tuple, p0: Optional[np.ndarray] = None):
        self.input = PromptSpace(spec, p0)
        self.spec = spec
        self.layer_std = tuple(float(s) for s in layer_std)
        self.n_layers = len(self.layer_std)
        self.A_deep = [
            np.random.default_rng([spec.seed, 2, layer]).normal(
                0.0, spec.alpha * std / np.sqrt(spec.intrinsic_dim),
                size=(spec.intrinsic_dim, spec.n_prompt_tokens * spec.hidden_size)).astype(np.float32)
            for layer, std in enumerate(self.layer_std[1:], start=1)
        ]
        self.P0 = self.input.P0

    @property
    def dim(self) -> int:
        return self.n_layers * self.spec.intrinsic_dim

    def project(self, z: np.ndarray) -> np.ndarray:
        """(k, L * d) -> (k, L, n, h) per-layer prompts."""
        d, n, h = self.spec.intrinsic_dim, self.spec.n_prompt_tokens, self.spec.hidden_size
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        if z.shape[1] != self.dim:
            raise ValueError(f"z has {z.shape[1]} entries, but {self.n_layers} layers x d={d} need {self.dim}.")
        out = np.empty((z.shape[0], self.n_layers, n, h), dtype=np.float32)
        out[:, 0] = self.input.project(z[:, :d])
        for layer, A in enumerate(self.A_deep, start=1):
            out[:, layer] = (z[:, layer * d:(layer + 1) * d] @ A).reshape(-1, n, h)
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.input.fingerprint().encode())
        for A in self.A_deep:
            h.update(A.tobytes())
        return h.hexdigest()[:16]


def make_space(method: str, config: PromptConfig, seed: int, info, embed_tokens: Callable[[list], np.ndarray]):
    """The prompt space of a run: per-layer (bbtv2) or input-only, from the teacher's ``describe()``.

    Raises:
        ConfigError: bbtv2 with a teacher that takes no per-layer prompts, or more
            ``prompt.deep_layers`` than the teacher has layers.
    """
    space = PromptSpace.create(config, seed, info.hidden_size, info.embedding_std, info.vocab_size, embed_tokens)
    if method != "bbtv2":
        return space
    if not info.layer_std:
        raise ConfigError(
            f"Method 'bbtv2' needs a teacher that takes per-layer prompts, but {info.model!r} accepts prompts "
            "at the input only. Use a local teacher model (an HF id or path), or method 'bbt' / 'gdfo'."
        )
    layers = config.deep_layers or len(info.layer_std)
    if layers > len(info.layer_std):
        raise ConfigError(f"prompt.deep_layers={layers}, but the teacher {info.model!r} has "
                          f"{len(info.layer_std)} layers. Choose at most {len(info.layer_std)}.")
    return DeepPromptSpace(space.spec, info.layer_std[:layers], space.P0)


def save_prompt(path: str, z: np.ndarray, space: PromptSpace, extra: dict) -> None:
    """A tuned prompt as JSON: z, the space's spec and fingerprint, and ``extra`` (task, teacher...)."""
    payload = {"z": np.asarray(z, dtype=float).tolist(), "space": asdict(space.spec),
               "fingerprint": space.fingerprint(), "p0": space.P0.tolist(), **extra}
    if isinstance(space, DeepPromptSpace):
        payload["layer_std"] = list(space.layer_std)
    with open(path, "w") as f:
        json.dump(payload, f)


def load_prompt(path: str) -> tuple[np.ndarray, "PromptSpace | DeepPromptSpace", dict]:
    """Rebuild (z, space, metadata) from :func:`save_prompt`; checks the fingerprint."""
    with open(path) as f:
        payload = json.load(f)
    spec_data = payload.pop("space")
    spec_data["p0_token_ids"] = tuple(spec_data["p0_token_ids"])
    spec, p0 = PromptSpaceSpec(**spec_data), np.asarray(payload.pop("p0"), dtype=np.float32)
    layer_std = payload.pop("layer_std", None)
    space = PromptSpace(spec, p0) if layer_std is None else DeepPromptSpace(spec, tuple(layer_std), p0)
    fingerprint = payload.pop("fingerprint")
    if space.fingerprint() != fingerprint:
        raise ValueError(f"{path}: rebuilt prompt space does not match its fingerprint {fingerprint}.")
    return np.asarray(payload.pop("z")), space, payload
