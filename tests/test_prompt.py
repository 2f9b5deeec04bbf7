"""The intrinsic prompt space (gdfo_ray/prompt.py)."""

import numpy as np
import pytest

from gdfo_ray.prompt import PromptSpace, PromptSpaceSpec, load_prompt, save_prompt


def test_prompt_space_is_seeded_and_roundtrips(tmp_path):
    spec = PromptSpaceSpec(6, 2, 4, 1.0, 0.5, "zeros", 7, ())
    a, b = PromptSpace(spec), PromptSpace(spec)
    np.testing.assert_array_equal(a.A, b.A)
    assert a.A.std() == pytest.approx(0.5 / np.sqrt(6), rel=0.5)
    z = np.arange(6.0)
    save_prompt(str(tmp_path / "p.json"), z, a, {"task": "sst2"})
    z2, space, meta = load_prompt(str(tmp_path / "p.json"))
    np.testing.assert_array_equal(z2, z)
    np.testing.assert_allclose(space.project(z2), a.project(z))
    assert meta["task"] == "sst2"
