"""Early stopping on a held-out plateau, as Bedrock RFT stops its jobs.

The reference is the best evaluation so far (the base model's first, where it was scored). An
evaluation improves on it when the held-out reward is higher beyond noise, by the one noise rule
of rft/stats.py (|change| > eval.noise_sigmas x the two-sample standard error);
it then becomes the reference. After `eval.patience` evaluations in a row that do not, the run stops.
An evaluation with too few prompts to tell counts neither way.
"""

from __future__ import annotations

from typing import Any

from rft.stats import reward_change


class EarlyStopping:
    """Fed each held-out evaluation in turn; says when `patience` of them in a row did not improve."""

    def __init__(self, patience: int, sigmas: float):
        self.patience = patience
        self.sigmas = sigmas
        self.best: tuple[int, dict[str, Any]] | None = None
        self.stale = 0

    def observe(self, step: int, summary: dict[str, Any]) -> str | None:
        """Take an evaluation summary (`EvalResult.summary()`); the one-line reason to stop, or None."""
        if self.best is None:
            self.best = (step, summary)
            return None
        best_step, best = self.best
        row = reward_change(best, summary, self.sigmas)
        if row.z is None:
            return None
        if row.better:
            self.best, self.stale = (step, summary), 0
            return None
        self.stale += 1
        if self.stale < self.patience:
            return None
        return (
            f"early stopping after step {step}: the held-out reward has not improved beyond noise on "
            f"{self.stale} evaluations since step {best_step} ({best['mean']:.3f} -> {summary['mean']:.3f}, "
            f"{row.verdict}); set eval.early_stopping: false to train all steps"
        )
