"""Training monitors: say when a run stops learning, overfits or games its reward.

Training steps are grouped into windows (`monitors.every` steps, default the evaluation interval).
A window's value for a metric is the mean over its steps, its noise the standard error of that mean
(spread of the step values / sqrt(steps)); a change between two windows is "beyond noise" when it
exceeds `eval.noise_sigmas` x the two-sample standard error, the same rule as held-out comparisons.

Monitors (each fires once when its condition starts to hold, and again only after it cleared):
- plateau: the training reward of the latest window is not above the one K windows earlier beyond noise;
- overfitting: training reward up beyond noise while the held-out reward is down beyond noise
  (latest evaluation against the one K evaluations earlier);
- reward hacking signals:
  - length_drift: mean completion length climbed to `length_limit_fraction` of the maximum;
  - component_divergence: one reward component up beyond noise while another (or the held-out score) is down;
  - judge_rule_disagreement: the same between a judge reward and a rule reward;
  - truncation_jump: truncated share up by more than `truncation_jump` from one window to the next;
  - entropy_collapse: entropy below `entropy_collapse_fraction` of the first window's;
- slice_regression: a slice's held-out reward down beyond noise against the baseline while the
  average is up ("gains on one slice must not break another").

Checked every step, from the first, because they mean the run cannot learn at all and waiting for
a window would waste it:
- truncation_saturated: at least `truncated_share_limit` of the completions were cut at the token
  limit in each of the last `early_steps` steps (they end before their answer);
- no_learning_signal: every group's rewards were equal in each of the last `early_steps` steps (all
  advantages are 0);
- reward_not_applicable: a reward function returned None for every completion of a step.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rft import metrics as names
from rft.config import MonitorConfig, RecipeConfig
from rft.jsonl import read_log
from rft.stats import Comparison, Stat, compare, compare_stats, overall

logger = logging.getLogger(__name__)

ALERTS_NAME = "alerts.jsonl"
TRAIN_REWARD = names.REWARD_MEAN
ENTROPY = names.ENTROPY.name
TRUNCATED = names.TRUNCATED_SHARE.name
LENGTH = names.LENGTH_MEAN
ZERO_VARIANCE = names.ZERO_VARIANCE_SHARE


@dataclass
class Alert:
    monitor: str
    step: int
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Window:
    """Training steps between two monitor checks, summarised per watched metric."""

    first_step: int
    last_step: int
    stats: dict[str, Stat]


def trend(before: Stat, after: Stat, sigmas: float) -> Comparison | None:
    """Change from `before` to `after` by the noise rule of rft.stats; None without a noise estimate."""
    found = compare_stats(before, after, sigmas)
    return found if found.z is not None else None


def _held_out_stat(summary: dict[str, Any]) -> Stat:
    return Stat(**summary["stats"]["reward"])


class Monitors:
    """Fed every step's metrics and every held-out evaluation; returns (and records) the alerts that fire."""

    def __init__(
        self,
        config: MonitorConfig,
        *,
        window_steps: int,
        sigmas: float,
        max_new_tokens: int,
        reward_names: Sequence[str],
        alerts_path: Path | None = None,
    ):
        self.config = config
        self.window_steps = window_steps
        self.sigmas = sigmas
        self.max_new_tokens = max_new_tokens
        self.components = [names.reward_key(name, "mean") for name in reward_names]
        judges = config.judge_rewards
        if judges is None:
            judges = [name for name in reward_names if "judge" in name.lower()]
        self.judges = {names.reward_key(name, "mean") for name in judges}
        self.watched = [TRAIN_REWARD, ENTROPY, TRUNCATED, LENGTH, *self.components]
        self.alerts_path = alerts_path
        self.none_shares = {name: names.reward_key(name, "none_share") for name in reward_names}
        self.recent: list[tuple[int, dict[str, float]]] = []
        self.pending: list[dict[str, float]] = []
        self.pending_steps: list[int] = []
        self.windows: list[Window] = []
        self.evaluations: list[tuple[int, dict[str, Any]]] = []
        self.alerts: list[Alert] = []
        self._active: set[str] = set()
        self._quiet = False

    @classmethod
    def from_recipe(
        cls, config: RecipeConfig, reward_names: Sequence[str], alerts_path: Path | None
    ) -> Monitors:
        window_steps = config.monitors.every or (max(2, config.eval.every) if config.eval.every else 10)
        return cls(
            config.monitors, window_steps=window_steps, sigmas=config.eval.noise_sigmas,
            max_new_tokens=config.rollout.max_new_tokens, reward_names=reward_names, alerts_path=alerts_path,
        )

    # ------------------------------------------------------------------ inputs
    def observe_step(self, step: int, metrics: dict[str, float]) -> list[Alert]:
        if not self.config.enabled:
            return []
        self.recent = [*self.recent, (step, metrics)][-self.config.early_steps :]
        alerts = self._check_step(step, metrics)
        self.pending.append({key: metrics[key] for key in self.watched if key in metrics})
        self.pending_steps.append(step)
        if step % self.window_steps == 0:
            keys = {key for values in self.pending for key in values}
            stats = {key: Stat.of([v[key] for v in self.pending if key in v]) for key in keys}
            self.windows.append(Window(self.pending_steps[0], step, stats))
            self.pending, self.pending_steps = [], []
            alerts += self._check_windows(step)
        return self._emit(alerts)

    def observe_eval(self, step: int, summary: dict[str, Any]) -> list[Alert]:
        """`summary`: an `EvalResult.summary()` of the main evaluation pass. The first one is the baseline."""
        if not self.config.enabled:
            return []
        self.evaluations.append((step, summary))
        return self._emit(self._check_evaluation(step, summary))

    def replay(self, metrics_rows: Iterable[dict[str, Any]], eval_rows: Iterable[dict[str, Any]]) -> None:
        """Rebuild state from a resumed run's logs without printing or recording alerts again."""
        evaluations = sorted(eval_rows, key=lambda row: row["step"])
        self._quiet = True
        try:
            for row in metrics_rows:
                while evaluations and evaluations[0]["step"] < row["step"]:
                    evaluation = evaluations.pop(0)
                    self.observe_eval(evaluation["step"], evaluation)
                self.observe_step(row["step"], row)
            for evaluation in evaluations:
                self.observe_eval(evaluation["step"], evaluation)
        finally:
            self._quiet = False

    # ------------------------------------------------------------------ checks
    def _fire(self, key: str, condition: bool, make: Callable[[], Alert]) -> list[Alert]:
        if not condition:
            self._active.discard(key)
            return []
        if key in self._active:
            return []
        self._active.add(key)
        return [make()]

    def _train_trend(self, key: str, span: int) -> tuple[Window, Window, Comparison] | None:
        """Trend of `key` from the window `span` back (or the first) to the latest."""
        if len(self.windows) < 2:
            return None
        earlier, latest = self.windows[max(0, len(self.windows) - 1 - span)], self.windows[-1]
        if key not in earlier.stats or key not in latest.stats:
            return None
        found = trend(earlier.stats[key], latest.stats[key], self.sigmas)
        return (earlier, latest, found) if found else None

    def _component_trends(self, span: int) -> dict[str, Comparison]:
        return {key: found[2] for key in self.components if (found := self._train_trend(key, span))}

    def _every_recent_step(self, key: str, condition: Callable[[float], bool]) -> bool:
        full = len(self.recent) == self.config.early_steps
        return full and all(key in metrics and condition(metrics[key]) for _, metrics in self.recent)

    def _check_step(self, step: int, metrics: dict[str, float]) -> list[Alert]:
        """The signs that a run cannot learn at all, checked every step (see the module docstring)."""
        config, alerts = self.config, []
        first = self.recent[0][0]
        saturated = self._every_recent_step(TRUNCATED, lambda share: share >= config.truncated_share_limit)
        alerts += self._fire("truncation_saturated", saturated, lambda: Alert(
            "truncation_saturated", step,
            f"{metrics[TRUNCATED]:.0%} of completions were cut at the {self.max_new_tokens}-token limit "
            f"(at least {config.truncated_share_limit:.0%} in each of steps {first}-{step}): they end before "
            "their answer, so rewards and advantages say little; raise rollout.max_new_tokens",
            {"truncated_share": metrics[TRUNCATED], "max_new_tokens": self.max_new_tokens,
             "from_step": first},
        ))
        flat = self._every_recent_step(ZERO_VARIANCE, lambda share: share >= 1.0)
        alerts += self._fire("no_learning_signal", flat, lambda: Alert(
            "no_learning_signal", step,
            f"every group's rewards were equal in steps {first}-{step} (training reward "
            f"{metrics.get(TRAIN_REWARD, math.nan):.3f}): all advantages are 0 and nothing is learned; "
            "the task is too hard or too easy for the model as sampled (check `rft reward check`, the "
            "rewards, rollout.max_new_tokens and rollout.temperature)",
            {"from_step": first, "reward": metrics.get(TRAIN_REWARD)},
        ))
        for name, key in self.none_shares.items():
            absent = metrics.get(key, 0.0) >= 1.0
            alerts += self._fire(f"reward_not_applicable:{name}", absent, lambda n=name: Alert(
                "reward_not_applicable", step,
                f"reward {n} returned None (not applicable) for every completion of step {step}: it "
                "contributes nothing to the reward; check its columns and the rows' fields",
                {"reward": n},
            ))
        return alerts

    def _check_windows(self, step: int) -> list[Alert]:
        alerts = self._check_plateau(step) + self._check_components(step)
        if len(self.windows) >= 2:
            alerts += self._check_truncation_jump(step) + self._check_drift(step)
        return alerts

    def _check_plateau(self, step: int) -> list[Alert]:
        span = self.config.window
        reward = self._train_trend(TRAIN_REWARD, span) if len(self.windows) > span else None
        if reward is None:
            return []
        earlier, latest, found = reward
        return self._fire("plateau", not found.better, lambda: Alert(
            "plateau", step,
            f"training reward {earlier.stats[TRAIN_REWARD].mean:.3f} (steps {earlier.first_step}-"
            f"{earlier.last_step}) -> {latest.stats[TRAIN_REWARD].mean:.3f} (steps {latest.first_step}-"
            f"{latest.last_step}): change {found.change:+.3f} is within {self.sigmas:g} x its s.e. "
            f"{found.stderr:.3f} over {span} windows",
            {"change": found.change, "stderr": found.stderr, "from_step": earlier.last_step, "to_step": step},
        ))

    def _check_components(self, step: int) -> list[Alert]:
        """A reward component up beyond noise while another is down (a judge against a rule, or two rules)."""
        alerts: list[Alert] = []
        trends = self._component_trends(self.config.window)
        for (rising, up), (falling, down) in itertools.permutations(trends.items(), 2):
            judge_pair = (rising in self.judges) != (falling in self.judges)
            monitor = "judge_rule_disagreement" if judge_pair else "component_divergence"
            alerts += self._fire(
                f"{monitor}:{rising}>{falling}", up.better and down.worse,
                lambda r=rising, f=falling, u=up, d=down, m=monitor: Alert(
                    m, step,
                    f"reward {names.reward_name(r)} rose {u.change:+.3f} while {names.reward_name(f)} "
                    f"fell {d.change:+.3f} (both beyond {self.sigmas:g} s.e.): is one being gamed at the "
                    "other's expense?",
                    {"rising": names.reward_name(r), "falling": names.reward_name(f), "rise": u.change,
                     "fall": d.change},
                ),
            )
        return alerts

    def _check_truncation_jump(self, step: int) -> list[Alert]:
        previous, latest = self.windows[-2], self.windows[-1]
        if TRUNCATED not in previous.stats or TRUNCATED not in latest.stats:
            return []
        before, after = previous.stats[TRUNCATED].mean, latest.stats[TRUNCATED].mean
        return self._fire("truncation_jump", after - before > self.config.truncation_jump, lambda: Alert(
            "truncation_jump", step,
            f"truncated share jumped {before:.2f} -> {after:.2f} "
            f"(more than {self.config.truncation_jump:g}): completions run into the length limit",
            {"before": before, "after": after},
        ))

    def _check_drift(self, step: int) -> list[Alert]:
        """Entropy collapse and length drift: the latest window against the first."""
        config, alerts = self.config, []
        first, latest = self.windows[0].stats, self.windows[-1].stats
        if ENTROPY in first and ENTROPY in latest and first[ENTROPY].mean > 0:
            start, now = first[ENTROPY].mean, latest[ENTROPY].mean
            collapsed = now / start < config.entropy_collapse_fraction
            alerts += self._fire("entropy_collapse", collapsed, lambda: Alert(
                "entropy_collapse", step,
                f"entropy fell to {now / start:.0%} of its start ({start:.3f} -> {now:.3f}): "
                "the policy stopped exploring",
                {"first": start, "latest": now},
            ))
        if LENGTH in first and LENGTH in latest:
            start, now = first[LENGTH].mean, latest[LENGTH].mean
            limit = config.length_limit_fraction * self.max_new_tokens
            alerts += self._fire("length_drift", now >= limit > start, lambda: Alert(
                "length_drift", step,
                f"mean completion length drifted {start:.1f} -> {now:.1f} tokens, at "
                f"{config.length_limit_fraction:.0%} of the {self.max_new_tokens}-token limit",
                {"first": start, "latest": now, "limit": self.max_new_tokens},
            ))
        return alerts

    def _check_evaluation(self, step: int, summary: dict[str, Any]) -> list[Alert]:
        if len(self.evaluations) < 2:
            return []
        span = self.config.window
        earlier_step, earlier = self.evaluations[max(0, len(self.evaluations) - 1 - span)]
        held_out = trend(_held_out_stat(earlier), _held_out_stat(summary), self.sigmas)
        alerts = self._check_overfitting(step, earlier_step, held_out) if held_out is not None else []
        return alerts + self._check_slices(step, summary)

    def _check_overfitting(self, step: int, earlier_step: int, held_out: Comparison) -> list[Alert]:
        """Training reward (or, with it flat, one component) up while the held-out reward is down."""
        alerts: list[Alert] = []
        train = self._train_trend(TRAIN_REWARD, self.config.window)
        train_up = train is not None and train[2].better
        component_trends = self._component_trends(self.config.window)
        if train is not None:
            change = train[2].change
            rising = [names.reward_name(key) for key, found in component_trends.items() if found.better]
            alerts += self._fire("overfitting", train_up and held_out.worse, lambda: Alert(
                "overfitting", step,
                f"training reward rose {change:+.3f} while held-out reward fell {held_out.change:+.3f} "
                f"(step {earlier_step} -> {step}; both beyond {self.sigmas:g} s.e.)"
                + (f"; rising components: {', '.join(rising)}" if len(self.components) > 1 else ""),
                {"train_change": change, "held_out_change": held_out.change, "from_step": earlier_step,
                 "rising_components": rising},
            ))
        # With the total training reward up, overfitting above already says it; a component rising
        # on its own (the total flat) while held-out falls is the signal left to catch here.
        if len(self.components) < 2 or train_up:
            return alerts
        for key, component in component_trends.items():
            alerts += self._fire(
                f"component_vs_held_out:{key}", component.better and held_out.worse,
                lambda k=key, c=component: Alert(
                    "component_divergence", step,
                    f"reward {names.reward_name(k)} rose {c.change:+.3f} in training while the held-out "
                    f"reward fell {held_out.change:+.3f} (both beyond {self.sigmas:g} s.e.)",
                    {"rising": names.reward_name(k), "rise": c.change, "held_out_change": held_out.change},
                ),
            )
        return alerts

    def _check_slices(self, step: int, summary: dict[str, Any]) -> list[Alert]:
        """A slice's reward down beyond noise against the baseline while the average is up."""
        alerts: list[Alert] = []
        baseline_step, baseline = self.evaluations[0]
        rows = compare(baseline, summary, self.sigmas)
        average = overall(rows)
        improving = average is not None and average.change > 0
        for row in rows:
            if row.metric != "reward" or row.tag is None:
                continue
            alerts += self._fire(
                f"slice_regression:{row.tag}={row.value}", improving and row.worse,
                lambda r=row, o=average: Alert(
                    "slice_regression", step,
                    f"slice {r.tag}={r.value} fell {r.before.mean:.3f} -> {r.after.mean:.3f} "
                    f"({r.z:+.1f} s.e.) since step {baseline_step} while the average rose {o.change:+.3f}",
                    {"tag": r.tag, "value": r.value, "change": r.change, "stderr": r.stderr,
                     "average_change": o.change},
                ),
            )
        return alerts

    # ------------------------------------------------------------------ output
    def _emit(self, alerts: list[Alert]) -> list[Alert]:
        self.alerts.extend(alerts)
        if self._quiet or not alerts:
            return alerts
        for alert in alerts:
            tqdm.write(f"monitor [{alert.monitor}] step {alert.step}: {alert.message}")
        if self.alerts_path is not None:
            with self.alerts_path.open("a") as handle:
                for alert in alerts:
                    handle.write(json.dumps(alert.to_dict(), default=str) + "\n")
        return alerts



def read_alerts(run_dir: Path) -> list[dict[str, Any]]:
    """The alerts a run recorded (none if it recorded none)."""
    alerts, _ = read_log(run_dir / ALERTS_NAME)
    return alerts
