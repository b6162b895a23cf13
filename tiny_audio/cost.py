"""What a run costs, and whether it has cost enough: the price per hour, the time and money spent, the budget.

The price is read once at start: COST_PER_HOUR or `budget.cost_per_hour` when given (a savings plan's price is
only known to the user), else, on a RunPod pod with an API key, the pod's own `cost` from RunPod's API. Time is
wall-clock since the container started (docker/start.sh exports the moment as TINY_AUDIO_STARTED_AT; without it,
since the meter was made), so model downloads and evaluations count, as they do on the bill. Each checkpoint
carries the hours and dollars spent so far (`state_dict`), and a resumed run adds on to them: a budget holds
over restarts, and a restarted container past it does not train again until the budget is raised.

MAX_HOURS and MAX_COST_USD (or `budget.max_hours`, `budget.max_cost_usd`) end the run as done: the trainer saves
a checkpoint, uploads it and exits 0, and start.sh does ON_FINISH.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tiny_audio.config import BudgetConfig
from tiny_audio.errors import UserError

log = logging.getLogger(__name__)

STARTED_AT_VAR = "TINY_AUDIO_STARTED_AT"


@dataclass(frozen=True)
class Budget:
    """The price and limits of a run, resolved from the environment and the config (environment first)."""

    usd_per_hour: float | None = None  # given by the user; None: ask RunPod (when `pod` is set) or unknown
    price_source: str = ""
    max_hours: float | None = None
    max_cost_usd: float | None = None
    pod: tuple[str, str, str] | None = field(default=None, repr=False)  # (pod id, API key, API URL) on RunPod


def _number(env: Mapping[str, str], name: str, configured: float | None, *, zero_ok: bool) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return configured
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        allowed = "a number >= 0" if zero_ok else "a number > 0"
        raise UserError(f"{name} must be {allowed}, got {raw!r}")
    return value


def check_budget(cfg: BudgetConfig, env: Mapping[str, str] | None = None) -> Budget:
    """The run's `Budget`; UserError (one line, before any download) for an unreadable value, or for
    MAX_COST_USD without any way to know the price."""
    env = os.environ if env is None else env
    price = _number(env, "COST_PER_HOUR", None, zero_ok=True)
    source = "COST_PER_HOUR"
    if price is None and cfg.cost_per_hour is not None:
        price, source = cfg.cost_per_hour, "budget.cost_per_hour"
    pod_id, api_key = env.get("RUNPOD_POD_ID") or None, env.get("RUNPOD_API_KEY") or None
    pod = None
    if price is None and pod_id and api_key:
        from tiny_audio.runpod_api import api_url_from_env

        pod, source = (pod_id, api_key, api_url_from_env(env)), f"RunPod pod {pod_id}"
    budget = Budget(
        usd_per_hour=price,
        price_source=source if price is not None or pod else "",
        max_hours=_number(env, "MAX_HOURS", cfg.max_hours, zero_ok=False),
        max_cost_usd=_number(env, "MAX_COST_USD", cfg.max_cost_usd, zero_ok=False),
        pod=pod,
    )
    if budget.max_cost_usd is not None and price is None and pod is None:
        raise UserError(
            f"a budget of ${budget.max_cost_usd:,.2f} (MAX_COST_USD / budget.max_cost_usd) needs the machine's price: "
            "set COST_PER_HOUR (USD per hour) or budget.cost_per_hour, or, on RunPod, RUNPOD_API_KEY"
        )
    return budget


def started_at(env: Mapping[str, str], default: float) -> float:
    """When the container started (TINY_AUDIO_STARTED_AT, Unix seconds), else `default`."""
    try:
        value = float(env.get(STARTED_AT_VAR, ""))
    except ValueError:
        return default
    return value if math.isfinite(value) and value <= default else default


def format_usd(amount: float) -> str:
    return f"${amount:,.2f}"


class CostMeter:
    """Hours and dollars this run has spent, over restarts; whether its budget is reached."""

    def __init__(
        self,
        budget: Budget,
        *,
        usd_per_hour: float | None,
        started: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.budget = budget
        self.usd_per_hour = usd_per_hour
        self.started = started
        self.clock = clock
        self.before_s = 0.0  # spent before this container, from the checkpoint resumed
        self.before_usd = 0.0

    # -- what was spent
    def spent(self) -> tuple[float, float | None]:
        """(seconds, dollars) spent so far, read at one moment; dollars are None when the price is unknown."""
        elapsed = max(0.0, self.clock() - self.started)
        usd = None if self.usd_per_hour is None else self.before_usd + elapsed / 3600 * self.usd_per_hour
        return self.before_s + elapsed, usd

    def seconds(self) -> float:
        return self.spent()[0]

    def usd(self) -> float | None:
        return self.spent()[1]

    def projected_usd(self, remaining_s: float) -> float | None:
        """Dollars at the end of the run, if the remaining `remaining_s` seconds cost what this machine costs."""
        spent = self.usd()
        if spent is None or self.usd_per_hour is None:
            return None
        return spent + max(0.0, remaining_s) / 3600 * self.usd_per_hour

    def metrics(self) -> dict[str, float]:
        seconds, usd = self.spent()
        return {"run/hours": seconds / 3600} | ({} if usd is None else {"run/cost_usd": usd})

    # -- the budget
    def reached(self) -> str | None:
        """One line naming the limit reached, or None."""
        seconds, usd = self.spent()
        hours, b = seconds / 3600, self.budget
        figures = f"{hours:.2f} h" + ("" if usd is None else f", {format_usd(usd)}")
        if b.max_cost_usd is not None and usd is not None and usd >= b.max_cost_usd:
            return (
                f"budget of {format_usd(b.max_cost_usd)} reached ({figures}); raise MAX_COST_USD "
                "(budget.max_cost_usd) to train on"
            )
        if b.max_hours is not None and hours >= b.max_hours:
            return f"budget of {b.max_hours:g} h reached ({figures}); raise MAX_HOURS (budget.max_hours) to train on"
        return None

    def describe(self) -> str:
        """The start-up line: the price and its source, the limits."""
        b = self.budget
        price = (
            f"{format_usd(self.usd_per_hour)}/hr ({b.price_source})"
            if self.usd_per_hour is not None
            else "price unknown (set COST_PER_HOUR to see costs)"
        )
        limits = []
        if b.max_hours is not None:
            limits.append(f"{b.max_hours:g} h")
        if b.max_cost_usd is not None:
            limits.append(format_usd(b.max_cost_usd))
        spent = f" | spent before this start: {self.before_s / 3600:.2f} h" if self.before_s else ""
        return f"cost: {price} | budget: {' or '.join(limits) or 'none'}{spent}"

    # -- checkpoints
    def state_dict(self) -> dict[str, float]:
        seconds, usd = self.spent()
        return {"seconds": seconds, "usd": self.before_usd if usd is None else usd}

    def load_state_dict(self, state: Mapping[str, float] | None) -> None:
        """Add on to what a checkpoint says was spent (nothing for a checkpoint saved without it)."""
        if not state:
            return
        self.before_s = float(state.get("seconds", 0.0))
        self.before_usd = float(state.get("usd", 0.0))


def start_meter(cfg: BudgetConfig, *, env: Mapping[str, str] | None = None, ask_runpod: bool = True) -> CostMeter:
    """The run's meter, its price read once: the user's, else the RunPod pod's (`ask_runpod`: on the main
    process only; the others count time alone). A price RunPod cannot give is a warning, unless a dollar budget
    depends on it (then a UserError)."""
    env = os.environ if env is None else env
    now = time.time()
    budget = check_budget(cfg, env)
    price = budget.usd_per_hour
    if price is None and budget.pod is not None and ask_runpod:
        from tiny_audio.runpod_api import RunPodError, pod_price

        pod_id, api_key, api_url = budget.pod
        try:
            price = pod_price(pod_id=pod_id, api_key=api_key, api_url=api_url)
        except RunPodError as error:
            if budget.max_cost_usd is not None:
                raise UserError(
                    f"{error}: the budget MAX_COST_USD needs the pod's price; set COST_PER_HOUR to give it"
                ) from None
            log.warning("cost: no price, so no costs shown (set COST_PER_HOUR to give it): %s", error)
    return CostMeter(budget, usd_per_hour=price, started=started_at(env, now))
