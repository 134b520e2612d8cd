"""Dollars from measured figures: serving cost per million inferences and per month.

The arithmetic is deliberately simple and every assumption is written into the report, so a
reader can redo it with their own prices. Compute cost assumes the instance is busy only while
serving (instance-hours = requests / throughput); storage cost is the model file kept in object
storage. GB means 10**9 bytes, as cloud storage is billed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shrinkml.errors import InputError

_SECONDS_PER_HOUR = 3600.0
_BYTES_PER_GB = 1e9
_THROUGHPUT_BASIS = "batch_n"


class CostSettings(BaseModel):
    """Prices and traffic behind the cost figures, in USD.

    ``price_per_hour`` defaults to an on-demand 2-vCPU x86 cloud instance (about 0.085 USD/h);
    ``storage_price_per_gb_month`` to standard object storage (0.023 USD per GB-month, GB = 10**9
    bytes). Change them to your own prices.

    >>> CostSettings(price_per_hour=0.17).requests_per_month
    10000000.0
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    price_per_hour: float = Field(0.085, gt=0)
    requests_per_month: float = Field(10_000_000.0, gt=0)
    storage_price_per_gb_month: float = Field(0.023, ge=0)


def model_cost(throughput_per_s: float, size_bytes: int, settings: CostSettings) -> dict[str, float]:
    """USD cost of serving one model at ``throughput_per_s`` inferences per second.

    >>> model_cost(100.0, 4_000_000, CostSettings())["cost_per_million_inferences"]  # doctest: +ELLIPSIS
    0.2361...
    """
    if not throughput_per_s > 0:
        raise ValueError(f"throughput_per_s must be positive, found {throughput_per_s}")
    if size_bytes < 0:
        raise ValueError(f"size_bytes must not be negative, found {size_bytes}")
    hours_per_inference = 1.0 / (throughput_per_s * _SECONDS_PER_HOUR)
    instance_hours = settings.requests_per_month * hours_per_inference
    compute = instance_hours * settings.price_per_hour
    storage = size_bytes / _BYTES_PER_GB * settings.storage_price_per_gb_month
    return {
        "cost_per_million_inferences": settings.price_per_hour * hours_per_inference * 1e6,
        "instance_hours_per_month": instance_hours,
        "compute_per_month": compute,
        "storage_per_month": storage,
        "total_per_month": compute + storage,
    }


def _cost_of(measurement: dict[str, Any], which: str, settings: CostSettings) -> dict[str, float]:
    try:
        throughput = float(measurement["throughput_per_s"][_THROUGHPUT_BASIS])
        size = int(measurement["size_bytes"])
    except (KeyError, TypeError) as exc:
        raise InputError(
            "the measurement lacks a figure the cost needs",
            where=f"{which} measurement",
            expected=f'"size_bytes" and "throughput_per_s": {{"{_THROUGHPUT_BASIS}": ...}}',
            found=f"keys {sorted(measurement)}",
            fix="measure throughput and size before computing cost",
        ) from exc
    return model_cost(throughput, size, settings)


def cost_report(baseline: dict[str, Any], compressed: dict[str, Any], settings: CostSettings) -> dict[str, Any]:
    """Cost of the baseline and the compressed model, and the savings, with all assumptions.

    ``savings.percent`` is the share of the baseline's total monthly cost that is saved.

    >>> cost_report(  # doctest: +SKIP
    ...     {"size_bytes": 4_000_000, "throughput_per_s": {"batch_n": 100.0}},
    ...     {"size_bytes": 1_000_000, "throughput_per_s": {"batch_n": 250.0}},
    ...     CostSettings(),
    ... )["savings"]["percent"]
    59.9...
    """
    base = _cost_of(baseline, "baseline", settings)
    comp = _cost_of(compressed, "compressed", settings)
    per_month = base["total_per_month"] - comp["total_per_month"]
    return {
        "currency": "USD",
        "assumptions": {**settings.model_dump(), "throughput_basis": _THROUGHPUT_BASIS},
        "baseline": base,
        "compressed": comp,
        "savings": {
            "per_million_inferences": base["cost_per_million_inferences"] - comp["cost_per_million_inferences"],
            "per_month": per_month,
            "percent": 100.0 * per_month / base["total_per_month"],
        },
    }
