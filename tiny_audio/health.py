"""When to think about cancelling a run, from the trend of its eval loss (the course's advice, built in).

Two signs, each said once in one line (and again only after it cleared):
  stalled      the best eval loss has not fallen by `min_improvement` (a fraction of it) within the last
               `plateau_steps` steps. The default window, 3,000 steps, lies past the flat stretch a healthy run
               of the course shows at its start (~1,500 steps), so that stretch alone does not trigger it.
  overfitting  the eval loss rose `rising_evals` evaluations in a row while the training loss fell.

The trainer logs the line and sends it to the tracker as an alert; it ends the run only when
`health.stop_on_warning` says so.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from tiny_audio.config import HealthConfig


@dataclass
class Evaluation:
    step: int
    eval_loss: float
    train_loss: float | None  # the latest logged training loss at that step


@dataclass
class EvalWatch:
    """Eval losses seen so far, and which warnings stand (kept in checkpoints: a resumed run keeps its window)."""

    cfg: HealthConfig = field(default_factory=HealthConfig)
    history: list[Evaluation] = field(default_factory=list)
    standing: set[str] = field(default_factory=set)
    train_loss: float | None = None

    def note_train_loss(self, loss: float) -> None:
        if math.isfinite(loss):
            self.train_loss = loss

    def observe(self, step: int, eval_loss: float) -> str | None:
        """Record an evaluation; the warning it raises (one line), or None."""
        if not math.isfinite(eval_loss):
            return None
        self.history.append(Evaluation(step, eval_loss, self.train_loss))
        warnings = [w for w in (self._stalled(), self._overfitting()) if w]
        return " | ".join(warnings) or None

    def _stalled(self) -> str | None:
        cfg, now = self.cfg, self.history[-1]
        before = [e for e in self.history if e.step <= now.step - cfg.plateau_steps]
        if not before:
            return None  # not a whole window yet
        reference = min(before, key=lambda e: e.eval_loss)
        recent = min((e for e in self.history if e.step > now.step - cfg.plateau_steps), key=lambda e: e.eval_loss)
        if recent.eval_loss < reference.eval_loss * (1 - cfg.min_improvement):
            self.standing.discard("stalled")
            return None
        if "stalled" in self.standing:
            return None
        self.standing.add("stalled")
        return (
            f"health: the eval loss has not fallen {cfg.min_improvement:.0%} in {cfg.plateau_steps:,} "
            f"step{'s' if cfg.plateau_steps != 1 else ''} (best "
            f"{reference.eval_loss:.3f} at step {reference.step:,}, {recent.eval_loss:.3f} since): the run looks "
            "stalled; consider cancelling it (health.plateau_steps, health.min_improvement)"
        )

    def _overfitting(self) -> str | None:
        n = self.cfg.rising_evals
        window = self.history[-(n + 1) :]
        rising = len(window) == n + 1 and all(a.eval_loss < b.eval_loss for a, b in itertools.pairwise(window))
        if not rising:
            if len(self.history) > 1 and self.history[-1].eval_loss < self.history[-2].eval_loss:
                self.standing.discard("overfitting")
            return None
        first, last = window[0], window[-1]
        falling = first.train_loss is not None and last.train_loss is not None and last.train_loss < first.train_loss
        if not falling or "overfitting" in self.standing:
            return None
        self.standing.add("overfitting")
        losses = " -> ".join(f"{e.eval_loss:.3f}" for e in window)
        return (
            f"health: the eval loss rose {n} evaluations in a row ({losses} at step {last.step:,}) while the "
            f"training loss fell ({first.train_loss:.3f} -> {last.train_loss:.3f}): overfitting; consider "
            "cancelling and keeping the best checkpoint (health.rising_evals)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [[e.step, e.eval_loss, e.train_loss] for e in self.history],
            "standing": sorted(self.standing),
            "train_loss": self.train_loss,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.history = [Evaluation(int(s), float(e), t) for s, e, t in state.get("history", [])]
        self.standing = set(state.get("standing", []))
        self.train_loss = state.get("train_loss")
