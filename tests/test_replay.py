"""The paid answers kept for distillation (gdfo_ray/replay.py)."""

import numpy as np

from gdfo_ray.replay import DistillBatch, ReplayBuffer


def _answers(i: int, k: int = 2, b: int = 3, c: int = 2):
    """Generation i: k candidates whose logits encode (candidate, example) so a sample can be traced back."""
    Z = np.full((k, 4), float(i)) + np.arange(k)[:, None] / 10
    logits = np.stack([[[100 * i + 10 * j + e, -1.0] for e in range(b)] for j in range(k)])
    return Z, logits, np.arange(b) + 5, np.arange(k, dtype=float)


def test_the_newest_answers_are_kept_and_a_sample_pairs_each_row_with_its_own_answer():
    buf = ReplayBuffer(capacity=4)
    for i in range(3):
        buf.add(*_answers(i))
    assert len(buf) == 4  # generation 0's two candidates are gone
    labels = np.arange(8) % 2
    batch = buf.sample(200, np.random.default_rng(0), labels)
    gen = np.round(batch.z[:, 0]).astype(int)
    cand = np.round((batch.z[:, 0] - gen) * 10).astype(int)
    assert set(gen) == {1, 2}
    np.testing.assert_array_equal(batch.teacher[:, 0], 100 * gen + 10 * cand + (batch.rows - 5))
    np.testing.assert_array_equal(batch.labels, labels[batch.rows])
    assert batch.pop_z is None


def test_a_ranking_batch_carries_one_whole_population_and_goes_to_the_first_shard_only():
    buf = ReplayBuffer(capacity=10)
    for i in range(2):
        buf.add(*_answers(i))
    batch = buf.sample(7, np.random.default_rng(1), np.zeros(8, int), pop_rows=3)
    assert batch.pop_z.shape == (2, 4) and len(batch.pop_rows) == 3 and len(set(batch.pop_rows)) == 3
    np.testing.assert_array_equal(batch.pop_fitness, [0.0, 1.0])
    shards = batch.shard(3)
    assert [len(s.rows) for s in shards] == [3, 2, 2]
    np.testing.assert_array_equal(np.concatenate([s.rows for s in shards]), batch.rows)
    assert shards[0].pop_z is batch.pop_z and all(s.pop_z is None for s in shards[1:])
    assert isinstance(shards[1], DistillBatch)
