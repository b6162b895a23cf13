"""tiny_audio.cost: the price's sources, money beside time, the budget over restarts, and the step line."""

from __future__ import annotations

import pytest

from tiny_audio.config import BudgetConfig
from tiny_audio.cost import Budget, CostMeter, check_budget, started_at
from tiny_audio.errors import UserError
from tiny_audio.tracking import format_step


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def meter(budget: Budget, *, price: float | None, started: float = 1000.0, now: float = 1000.0) -> CostMeter:
    return CostMeter(budget, usd_per_hour=price, started=started, clock=Clock(now))


def test_the_price_comes_from_the_user_first_then_from_the_pod() -> None:
    pod = {"RUNPOD_POD_ID": "p", "RUNPOD_API_KEY": "k"}
    assert check_budget(BudgetConfig(), {**pod, "COST_PER_HOUR": "0.79"}).usd_per_hour == 0.79
    configured = check_budget(BudgetConfig(cost_per_hour=1.5), pod)
    assert (configured.usd_per_hour, configured.price_source, configured.pod) == (1.5, "budget.cost_per_hour", None)
    asked = check_budget(BudgetConfig(), pod)
    assert asked.usd_per_hour is None and asked.pod == ("p", "k", "https://api.runpod.io/v2")
    assert check_budget(BudgetConfig(), {}) == Budget()  # not on RunPod, no price: no costs, nothing else


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAX_COST_USD": "20"}, "needs the machine's price: set COST_PER_HOUR"),
        ({"MAX_COST_USD": "20", "RUNPOD_POD_ID": "p"}, "or, on RunPod, RUNPOD_API_KEY"),
        ({"MAX_HOURS": "0"}, "MAX_HOURS must be a number > 0, got '0'"),
        ({"MAX_HOURS": "soon"}, "MAX_HOURS must be a number > 0"),
        ({"COST_PER_HOUR": "-1"}, "COST_PER_HOUR must be a number >= 0"),
        ({"MAX_COST_USD": "inf", "COST_PER_HOUR": "1"}, "MAX_COST_USD must be a number > 0"),
    ],
)
def test_budget_mistakes_are_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        check_budget(BudgetConfig(), env)


def test_the_environment_overrides_the_config() -> None:
    budget = check_budget(BudgetConfig(max_hours=10, max_cost_usd=5, cost_per_hour=1), {"MAX_HOURS": "2"})
    assert (budget.max_hours, budget.max_cost_usd) == (2.0, 5.0)


def test_money_follows_from_the_price_and_the_wall_clock() -> None:
    m = meter(Budget(), price=2.0, started=1000.0, now=1000.0 + 1800)
    assert m.usd() == pytest.approx(1.0) and m.seconds() == 1800
    assert m.projected_usd(remaining_s=3600) == pytest.approx(3.0)
    assert m.metrics() == {"run/hours": 0.5, "run/cost_usd": pytest.approx(1.0)}
    unknown = meter(Budget(), price=None, now=1000.0 + 1800)
    assert unknown.usd() is None and unknown.projected_usd(3600) is None and unknown.metrics() == {"run/hours": 0.5}


def test_a_budget_holds_over_restarts() -> None:
    budget = Budget(usd_per_hour=3.0, max_cost_usd=2.0)
    first = meter(budget, price=3.0, started=0.0, now=1800.0)  # $1.50 spent
    assert first.reached() is None
    second = meter(budget, price=4.0, started=5000.0, now=5000.0 + 540)  # a restart on a dearer pod: +$0.60
    second.load_state_dict(first.state_dict())
    assert second.usd() == pytest.approx(2.10) and second.seconds() == pytest.approx(2340)
    reached = second.reached()
    assert reached is not None and reached.startswith("budget of $2.00 reached (0.65 h, $2.10)")
    assert "raise MAX_COST_USD" in reached
    hours = meter(Budget(max_hours=1.0), price=None, started=0.0, now=3600.0)
    assert hours.reached() == "budget of 1 h reached (1.00 h); raise MAX_HOURS (budget.max_hours) to train on"


def test_time_counts_from_the_containers_start() -> None:
    assert started_at({"TINY_AUDIO_STARTED_AT": "1700000000"}, default=1700000100.0) == 1700000000.0
    assert started_at({}, default=5.0) == 5.0
    assert started_at({"TINY_AUDIO_STARTED_AT": "later"}, default=5.0) == 5.0
    assert started_at({"TINY_AUDIO_STARTED_AT": "9e99"}, default=5.0) == 5.0  # not in the future


def test_the_step_line_shows_money_beside_time() -> None:
    metrics = {"train/loss": 8.34, "train/grad_norm": 45.2, "train/lr": 1e-4, "train/samples_per_s": 12.3}
    line = format_step(25, 20000, metrics, seconds_per_step=2.52, usd=(6.2, 11.4))
    assert line == (
        "Step 25/20000 | Loss: 8.34 | Grad Norm: 45.2 | LR: 1e-04 | ETA: 14.0hr | $6.20 of ~$11.40 | 12.3 samples/s"
    )
    without = format_step(25, 20000, metrics, seconds_per_step=2.52)
    assert without == "Step 25/20000 | Loss: 8.34 | Grad Norm: 45.2 | LR: 1e-04 | ETA: 14.0hr | 12.3 samples/s"
