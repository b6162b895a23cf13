"""tiny_audio.health on synthetic metric series: a flat eval loss and a rising one warn, a healthy run does not."""

from __future__ import annotations

from tiny_audio.config import HealthConfig
from tiny_audio.health import EvalWatch


def feed(watch: EvalWatch, series: list[tuple[int, float, float]]) -> list[tuple[int, str]]:
    """(step, train loss, eval loss) in order -> the warnings raised, with their step."""
    warnings = []
    for step, train_loss, eval_loss in series:
        watch.note_train_loss(train_loss)
        warning = watch.observe(step, eval_loss)
        if warning:
            warnings.append((step, warning))
    return warnings


def test_a_healthy_run_raises_nothing() -> None:
    series = [(s, 3.0 - s / 10_000, 3.0 - s / 9_000) for s in range(1000, 20_001, 1000)]
    assert feed(EvalWatch(HealthConfig()), series) == []


def test_the_courses_plateau_alone_raises_nothing() -> None:
    """Flat for the first ~1,500 steps, then the drop: a healthy run of the course, under the default window."""
    flat = [(s, 8.0, 7.90 + 0.001 * (s % 2)) for s in range(0, 1501, 250)]
    drop = [(s, 8.0 - (s - 1500) / 500, 7.9 - (s - 1500) / 500) for s in range(1750, 3501, 250)]
    assert feed(EvalWatch(HealthConfig(plateau_steps=3000)), flat + drop) == []


def test_a_flat_eval_loss_warns_once_past_the_window() -> None:
    series = [(s, 2.5 - s / 100_000, 2.40 + 0.002 * (s % 3000 == 0)) for s in range(1000, 9001, 1000)]
    warnings = feed(EvalWatch(HealthConfig(plateau_steps=3000, min_improvement=0.01)), series)
    assert [step for step, _ in warnings] == [4000]  # the first eval a whole window after one (step 1,000)
    (text,) = [w for _, w in warnings]
    assert text.startswith("health: the eval loss has not fallen 1% in 3,000 steps") and "\n" not in text
    assert "consider cancelling" in text


def test_a_stalled_run_that_recovers_may_warn_again() -> None:
    cfg = HealthConfig(plateau_steps=2000, min_improvement=0.05)
    series = [(1000, 3, 2.0), (2000, 3, 2.0), (3000, 3, 2.0)]  # stalled at 3,000
    series += [(4000, 3, 1.5), (5000, 3, 1.5)]  # falls: cleared
    series += [(6000, 3, 1.5)]  # stalled again: no 5% fall from the best before step 4,000
    assert [step for step, _ in feed(EvalWatch(cfg), series)] == [3000, 6000]


def test_an_eval_loss_rising_three_times_while_training_loss_falls_warns() -> None:
    series = [(1000, 2.0, 1.80), (2000, 1.8, 1.70), (3000, 1.6, 1.75), (4000, 1.4, 1.82), (5000, 1.2, 1.90)]
    warnings = feed(EvalWatch(HealthConfig(rising_evals=3, plateau_steps=100_000)), series)
    assert [step for step, _ in warnings] == [5000]
    text = warnings[0][1]
    assert "rose 3 evaluations in a row (1.700 -> 1.750 -> 1.820 -> 1.900 at step 5,000)" in text
    assert "training loss fell (1.800 -> 1.200)" in text and "overfitting" in text


def test_a_rising_eval_loss_with_a_rising_training_loss_is_not_overfitting() -> None:
    series = [(1000, 1.0, 1.0), (2000, 1.1, 1.1), (3000, 1.2, 1.2), (4000, 1.3, 1.3)]
    assert feed(EvalWatch(HealthConfig(rising_evals=3, plateau_steps=100_000)), series) == []


def test_the_watch_resumes_with_its_history() -> None:
    cfg = HealthConfig(plateau_steps=3000)
    before = EvalWatch(cfg)
    assert feed(before, [(1000, 3, 2.0), (2000, 3, 2.0)]) == []
    after = EvalWatch(cfg)
    after.load_state_dict(before.state_dict())
    assert [step for step, _ in feed(after, [(3000, 3, 2.0), (4000, 3, 2.0)])] == [4000]
