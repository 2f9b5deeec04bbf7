"""Black-box call accounting: charged before dispatch, never exceeded."""

from __future__ import annotations

from dataclasses import dataclass

from gdfo_ray.exceptions import BudgetExhaustedError


@dataclass
class CallBudget:
    """Calls on the train batch (the budget) and dev calls (reported apart, as in BBT).

    >>> b = CallBudget(total=3); b.charge(2); b.remaining
    1
    """

    total: int
    spent: int = 0
    dev_calls: int = 0

    @property
    def remaining(self) -> int:
        return self.total - self.spent

    def can_afford(self, calls: int) -> bool:
        return calls <= self.remaining

    def charge(self, calls: int) -> None:
        if calls < 0:
            raise ValueError(f"calls must be >= 0, but got {calls}.")
        if calls > self.remaining:
            raise BudgetExhaustedError(
                f"Charging {calls} calls would exceed the budget: {self.spent} of {self.total} spent, "
                f"{self.remaining} left."
            )
        self.spent += calls
