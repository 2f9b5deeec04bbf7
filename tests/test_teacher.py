"""The teacher pool (gdfo_ray/teachers/): a request split into pieces over teachers and put back in order."""

import numpy as np
import pytest

from gdfo_ray.teachers import TeacherPool


class Echo:
    """A teacher whose logits say which prompt and example they answer, and which calls it got."""

    def __init__(self):
        self.pieces = []

    def query(self, prompts, split, example_ids, call_ids=None):
        self.pieces.append((len(prompts), len(example_ids), list(call_ids or [])))
        return np.stack([[[p[0, 0], e] for e in example_ids] for p in prompts]).astype(float)


def _prompts(k):
    return np.arange(k, dtype=float)[:, None, None] * np.ones((k, 2, 3))


def test_a_population_is_shared_among_teachers_and_reassembled_in_order():
    teachers = [Echo(), Echo()]
    out = TeacherPool(teachers).query(_prompts(5), "train", np.arange(4))
    np.testing.assert_array_equal(out[:, :, 0], np.arange(5)[:, None] * np.ones((5, 4)))
    np.testing.assert_array_equal(out[:, :, 1], np.ones((5, 1)) * np.arange(4))
    assert sorted(k for t in teachers for k, _, _ in t.pieces) == [2, 3]  # one forward each


def test_a_service_gets_one_call_per_candidate_with_its_call_id():
    teachers = [Echo(), Echo()]
    out = TeacherPool(teachers, one_call_per_piece=True).query(_prompts(3), "train", np.arange(2),
                                                               call_ids=["a", "b", "c"])
    np.testing.assert_array_equal(out[:, 0, 0], [0, 1, 2])
    pieces = teachers[0].pieces + teachers[1].pieces
    assert sorted(ids[0] for _, _, ids in pieces) == ["a", "b", "c"] and all(k == 1 for k, _, _ in pieces)


def test_one_prompt_on_many_examples_is_split_by_example():
    teachers = [Echo(), Echo()]
    out = TeacherPool(teachers).query(_prompts(1), "dev", np.arange(10, 17))
    np.testing.assert_array_equal(out[0, :, 1], np.arange(10, 17))
    assert sorted(b for t in teachers for _, b, _ in t.pieces) == [3, 4]
    with pytest.raises(ValueError, match="at least one teacher"):
        TeacherPool([])
