"""The intrinsic prompt space P(z) = P0 + A z (METHOD.md, Objects), seeded and reproducible."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np

from gdfo_ray.config import PromptConfig


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


def save_prompt(path: str, z: np.ndarray, space: PromptSpace, extra: dict) -> None:
    """A tuned prompt as JSON: z, the space's spec and fingerprint, and ``extra`` (task, teacher...)."""
    payload = {"z": np.asarray(z, dtype=float).tolist(), "space": asdict(space.spec),
               "fingerprint": space.fingerprint(), "p0": space.P0.tolist(), **extra}
    with open(path, "w") as f:
        json.dump(payload, f)


def load_prompt(path: str) -> tuple[np.ndarray, PromptSpace, dict]:
    """Rebuild (z, space, metadata) from :func:`save_prompt`; checks the fingerprint."""
    with open(path) as f:
        payload = json.load(f)
    spec_data = payload.pop("space")
    spec_data["p0_token_ids"] = tuple(spec_data["p0_token_ids"])
    space = PromptSpace(PromptSpaceSpec(**spec_data), np.asarray(payload.pop("p0"), dtype=np.float32))
    fingerprint = payload.pop("fingerprint")
    if space.fingerprint() != fingerprint:
        raise ValueError(f"{path}: rebuilt prompt space does not match its fingerprint {fingerprint}.")
    return np.asarray(payload.pop("z")), space, payload
