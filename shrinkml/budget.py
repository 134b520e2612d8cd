"""The accuracy budget: the largest acceptable drop of the task's primary metric."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Budget(BaseModel):
    """Largest acceptable drop of the task's primary metric, checked against the CI's worst end.

    ``absolute``: in metric units (0.01 = 1 point of accuracy); ``relative``: a fraction of the
    baseline's value.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    max_drop: float = Field(0.01, ge=0)
    drop_type: Literal["absolute", "relative"] = "absolute"

    def allows(self, drop: float, baseline_value: float) -> bool:
        """Whether a drop (in metric units) is within the budget."""
        if self.drop_type == "relative":
            return drop <= self.max_drop * baseline_value
        return drop <= self.max_drop
