"""In-memory datasets as numpy arrays, and their seeded, disjoint splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shrinkml.errors import InputError


@dataclass(frozen=True)
class ArrayData:
    """Inputs ``x`` (first axis = examples) and optional integer labels ``y``."""

    x: np.ndarray
    y: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.y is not None and len(self.y) != len(self.x):
            raise InputError(
                "inputs and labels have different lengths",
                where="data",
                expected="as many labels in y as examples in x",
                found=f"{len(self.x)} examples and {len(self.y)} labels",
                fix="pass arrays of equal length along the first axis",
            )

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, index: np.ndarray) -> ArrayData:
        return ArrayData(self.x[index], None if self.y is None else self.y[index])

    def batches(self, batch_size: int):
        """Yield ``(x, y)`` numpy batches in order (``y`` is None without labels)."""
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            yield self.x[start:stop], (None if self.y is None else self.y[start:stop])


class SplitFractions(BaseModel):
    """How a single dataset is divided when the user does not give the splits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    calibration: float = Field(0.1, gt=0, lt=1)
    finetune: float = Field(0.5, ge=0, lt=1)
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.3, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_at_most_one(self) -> SplitFractions:
        if self.calibration + self.finetune + self.validation + self.test > 1 + 1e-9:
            raise ValueError("calibration + finetune + validation + test must be at most 1")
        return self


@dataclass(frozen=True)
class Splits:
    """Disjoint parts of the user's data. ``calibration`` feeds quantizers, ``finetune`` training,
    ``validation`` every choice made inside a run (``keep_float: auto``, searches); ``test`` only the
    final measurement, never a choice."""

    calibration: ArrayData
    finetune: ArrayData
    test: ArrayData
    source: str
    seed: int
    validation: ArrayData | None = None

    def sizes(self) -> dict[str, int]:
        sizes = {"calibration": len(self.calibration), "finetune": len(self.finetune)}
        if self.validation is not None:
            sizes["validation"] = len(self.validation)
        return {**sizes, "test": len(self.test)}

    def named(self) -> list[tuple[str, ArrayData]]:
        """Every split that is there, by name, test last."""
        parts = [("calibration", self.calibration), ("fine-tune", self.finetune)]
        if self.validation is not None:
            parts.append(("validation", self.validation))
        return [*parts, ("test", self.test)]


def make_splits(
    data: ArrayData, *, seed: int, fractions: SplitFractions | None = None, source: str = "data"
) -> Splits:
    """Shuffle with ``seed`` and cut into calibration / test / fine-tune / validation (disjoint,
    deterministic; the order keeps calibration and test the same whatever the other fractions)."""
    fractions = fractions or SplitFractions()
    n = len(data)
    n_cal = int(round(n * fractions.calibration))
    n_test = int(round(n * fractions.test))
    n_ft = min(int(round(n * fractions.finetune)), n - n_cal - n_test)
    n_val = min(int(round(n * fractions.validation)), n - n_cal - n_test - n_ft)
    left = n - n_cal - n_test - n_ft - n_val
    if left and fractions.calibration + fractions.finetune + fractions.validation + fractions.test > 1 - 1e-9:
        # fractions that sum to 1 use every example: rounding (half to even) can leave one or two
        # over; they go to the last split that is asked for, so calibration and test stay as cut
        if fractions.validation > 0:
            n_val += left
        elif fractions.finetune > 0:
            n_ft += left
        else:
            n_test += left
    if n_cal < 1 or n_test < 2:
        raise InputError(
            "the data is too small to split",
            where=source,
            expected="enough examples for at least 1 calibration and 2 test examples",
            found=f"{n} examples",
            fix="give more examples, or give the splits explicitly",
        )
    order = np.random.default_rng(seed).permutation(n)
    cal, test, ft = order[:n_cal], order[n_cal : n_cal + n_test], order[n_cal + n_test : n_cal + n_test + n_ft]
    val = order[n_cal + n_test + n_ft : n_cal + n_test + n_ft + n_val]
    return Splits(data.subset(cal), data.subset(ft), data.subset(test), source=source, seed=seed,
                  validation=data.subset(val))
