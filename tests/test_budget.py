"""The call budget (gdfo_ray/budget.py)."""

import pytest

from gdfo_ray.budget import CallBudget
from gdfo_ray.exceptions import BudgetExhaustedError


def test_budget_is_never_exceeded():
    budget = CallBudget(total=10)
    budget.charge(6)
    assert not budget.can_afford(5)
    with pytest.raises(BudgetExhaustedError, match="6 of 10 spent"):
        budget.charge(5)
    assert budget.spent == 6
