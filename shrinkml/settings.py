"""How a run measures: runtime, threads, batch sizes, rounds, seed, splits and cost inputs."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shrinkml.cost import CostSettings
from shrinkml.data.arrays import SplitFractions


def _default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 4))


class RunSettings(BaseModel):
    """How a run measures: runtime, threads, batch sizes, repeats, seed, splits and cost inputs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    runtime: str = Field("onnxruntime", description="where the models are timed: a registered runtime")
    threads: int = Field(default_factory=_default_threads, ge=1)
    batch_n: int = Field(32, ge=2, description="the larger batch size timed besides batch 1")
    warmup: int = Field(3, ge=1)
    repeats: int = Field(20, ge=10, description="minimum interleaved timed rounds per batch size")
    timing_tolerance: float = Field(
        0.05, gt=0, description="add timed rounds until each speedup's 95% CI is within +- this fraction"
    )
    max_timing_s: float = Field(
        20.0, ge=0, description="time cap per batch size for the added rounds (0: exactly `repeats` rounds)"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the splits, bootstrap and training")
    bootstrap_resamples: int = Field(2000, ge=200)
    export_tolerance: float = Field(1e-4, gt=0)
    max_length: int | None = Field(
        None, ge=2, description="token length texts are padded/truncated to (default min(model's max, 128))"
    )
    measure_memory: bool = True
    new_tokens: int = Field(128, ge=2, le=4096, description="causal LMs: tokens generated per timed greedy generation")
    random_weights: bool = Field(
        False, description="run a factory model given without weights as built (architecture benchmarking)"
    )
    splits: SplitFractions = SplitFractions()
    cost: CostSettings = CostSettings()

    @field_validator("runtime")
    @classmethod
    def _registered(cls, name: str) -> str:
        from shrinkml.runtimes import runtime_names

        if name not in runtime_names():
            raise ValueError(f"unknown runtime {name!r}; registered: {', '.join(runtime_names())}")
        return name
