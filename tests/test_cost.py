import pytest
from pydantic import ValidationError

from shrinkml.cost import CostSettings, cost_report, model_cost
from shrinkml.errors import InputError


def _measurement(size_bytes: int, throughput: float) -> dict:
    return {"size_bytes": size_bytes, "throughput_per_s": {"batch_n": throughput}}


def test_model_cost_by_hand():
    settings = CostSettings(price_per_hour=0.36, requests_per_month=7_200_000, storage_price_per_gb_month=0.02)
    cost = model_cost(100.0, 2_500_000_000, settings)
    # 100/s = 360 000 per hour: 1e6 inferences take 1e6/360000 h at 0.36 USD/h = 1.0 USD.
    assert cost["cost_per_million_inferences"] == pytest.approx(1.0)
    assert cost["instance_hours_per_month"] == pytest.approx(20.0)  # 7.2e6 / 360 000
    assert cost["compute_per_month"] == pytest.approx(7.2)  # 20 h * 0.36
    assert cost["storage_per_month"] == pytest.approx(0.05)  # 2.5 GB (1e9 bytes) * 0.02
    assert cost["total_per_month"] == pytest.approx(7.25)


def test_defaults_are_the_documented_prices():
    settings = CostSettings()
    assert (settings.price_per_hour, settings.requests_per_month, settings.storage_price_per_gb_month) == (
        0.085,
        10_000_000,
        0.023,
    )


def test_halving_throughput_doubles_compute_cost():
    settings = CostSettings()
    fast = model_cost(200.0, 0, settings)
    slow = model_cost(100.0, 0, settings)
    for key in ("cost_per_million_inferences", "instance_hours_per_month", "compute_per_month", "total_per_month"):
        assert slow[key] == pytest.approx(2 * fast[key])


def test_cost_report_savings():
    settings = CostSettings(price_per_hour=0.36, requests_per_month=7_200_000, storage_price_per_gb_month=0.02)
    report = cost_report(_measurement(2_500_000_000, 100.0), _measurement(500_000_000, 400.0), settings)
    assert report["currency"] == "USD"
    assert report["assumptions"] == {
        "price_per_hour": 0.36,
        "requests_per_month": 7_200_000,
        "storage_price_per_gb_month": 0.02,
        "throughput_basis": "batch_n",
    }
    assert report["baseline"]["total_per_month"] == pytest.approx(7.25)
    assert report["compressed"]["total_per_month"] == pytest.approx(1.8 + 0.01)
    savings = report["savings"]
    assert savings["per_million_inferences"] == pytest.approx(0.75)
    assert savings["per_month"] == pytest.approx(7.25 - 1.81)
    assert savings["percent"] == pytest.approx(100 * (7.25 - 1.81) / 7.25)


def test_slower_compressed_model_shows_negative_savings():
    report = cost_report(_measurement(1000, 100.0), _measurement(1000, 50.0), CostSettings())
    assert report["savings"]["per_month"] < 0
    assert report["savings"]["percent"] == pytest.approx(-100.0, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"price_per_hour": 0},
        {"price_per_hour": -1.0},
        {"requests_per_month": 0},
        {"storage_price_per_gb_month": -0.01},
        {"gpu": True},
    ],
)
def test_invalid_settings_are_rejected(kwargs):
    with pytest.raises(ValidationError):
        CostSettings(**kwargs)


def test_settings_are_frozen():
    with pytest.raises(ValidationError):
        CostSettings().price_per_hour = 1.0


@pytest.mark.parametrize(("throughput", "size"), [(0.0, 10), (-5.0, 10), (10.0, -1)])
def test_model_cost_rejects_impossible_measurements(throughput, size):
    with pytest.raises(ValueError):
        model_cost(throughput, size, CostSettings())


def test_missing_throughput_is_an_input_error():
    with pytest.raises(InputError, match="batch_n"):
        cost_report(
            {"size_bytes": 10, "throughput_per_s": {"batch_1": 5.0}}, _measurement(10, 5.0), CostSettings()
        )
