"""The driver on a synthetic black box where a linear student can be a perfect surrogate."""

import numpy as np
import pytest

from gdfo_ray import TeacherError
from synthetic_blackbox import B, calls_to_reach, setup_synthetic


def test_gdfo_reaches_target_in_clearly_fewer_calls_than_bbt():
    target = 0.1
    gdfo, bbt = [], []
    for seed in range(5):
        for method, out in (("gdfo", gdfo), ("bbt", bbt)):
            driver, _ = setup_synthetic(method, seed)
            out.append(calls_to_reach(driver.run().history, target))
    assert np.median(gdfo) < 0.7 * np.median(bbt), (gdfo, bbt)


def test_budget_is_never_exceeded_and_teacher_calls_match():
    for method in ("bbt", "gdfo", "kd"):
        driver, teacher = setup_synthetic(method, 0, budget=30)
        state = driver.run()
        assert state.budget.spent == 24 == teacher.calls - state.budget.dev_calls
        assert [r["calls"] for r in state.history] == [8, 16, 24]


def test_nan_from_teacher_stops_with_the_candidate_named():
    driver, _ = setup_synthetic("bbt", 0, nan_after=10)
    with pytest.raises(TeacherError, match=r"candidate\(s\) \[7\]"):
        driver.run()


def test_fidelity_compares_student_and_teacher_on_the_same_rows_and_leaves_the_run_unchanged():
    runs = {}
    for n in (4, B):
        driver, _ = setup_synthetic("gdfo", 3, budget=160, fidelity_rows=n)
        runs[n] = (driver, driver.run().history)
    few, every = runs[4], runs[B]
    assert len(few[0].fidelity_rows) == 4 and len(set(few[0].fidelity_rows)) == 4
    assert list(every[0].fidelity_rows) == list(range(B))
    # Only the diagnostic differs: the search and the student took the same steps.
    assert [r["fitness_best"] for r in few[1]] == [r["fitness_best"] for r in every[1]]
    assert [r["fidelity"] for r in few[1]] != [r["fidelity"] for r in every[1]]
    # The exact surrogate student ranks the population as the teacher does on those rows.
    assert np.median([r["fidelity"] for r in every[1][5:]]) > 0.5
