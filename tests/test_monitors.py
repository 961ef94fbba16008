"""Monitors on synthetic metric streams whose right answer is known, then inside a real (tiny) run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rft.config import MonitorConfig
from rft.monitors import ALERTS_NAME, Monitors

NOISE = [0.02, -0.02, 0.01, -0.01]  # step-to-step wobble, so windows have a noise estimate


def make(tmp_path: Path | None = None, **config) -> Monitors:
    return Monitors(
        MonitorConfig(**{"window": 2, **config}), window_steps=4, sigmas=2.0, max_new_tokens=100,
        reward_names=["correct", "style_judge"], alerts_path=tmp_path / ALERTS_NAME if tmp_path else None,
    )


def step_metrics(step: int, reward: float, **extra: float) -> dict[str, float]:
    wobble = NOISE[step % len(NOISE)]
    return {
        "reward/mean": reward + wobble, "reward/correct/mean": reward + wobble,
        "reward/style_judge/mean": 0.5 + wobble,
        "entropy": 2.0 + wobble, "completion/truncated_share": 0.05, "completion/length/mean": 40.0 + wobble,
        **extra,
    }


def summary(mean: float, stderr: float = 0.02, count: int = 100, slices: dict | None = None) -> dict:
    stat = {"mean": mean, "stderr": stderr, "count": count}
    return {"stats": {"reward": stat}, "slices": slices or {}}


def feed(monitors: Monitors, steps: range, **fields) -> list:
    alerts = []
    for step in steps:
        values = {key: (value(step) if callable(value) else value) for key, value in fields.items()}
        reward = values.pop("reward", 0.5)
        alerts += monitors.observe_step(step, step_metrics(step, reward, **values))
    return alerts


def names(alerts: list) -> list[str]:
    return [alert.monitor for alert in alerts]


def test_plateau_fires_on_a_flat_reward_and_not_on_a_rising_one(tmp_path: Path) -> None:
    flat = make(tmp_path)
    alerts = feed(flat, range(1, 13), reward=0.5)
    # Windows end at 4, 8, 12; K=2 needs three windows: the check first runs at step 12.
    assert names(alerts) == ["plateau"] and alerts[0].step == 12
    assert "within 2 x its s.e." in alerts[0].message
    written = [json.loads(line) for line in (tmp_path / ALERTS_NAME).read_text().splitlines()]
    assert [a["monitor"] for a in written] == ["plateau"]
    assert feed(flat, range(13, 17), reward=0.5) == []  # still flat: it fired once, not again
    assert "plateau" not in names(feed(make(), range(1, 13), reward=lambda s: 0.1 + 0.05 * s))


def test_overfitting_needs_train_up_and_held_out_down() -> None:
    monitors = make()
    monitors.observe_eval(0, summary(0.50))
    feed(monitors, range(1, 5), reward=0.3)
    assert monitors.observe_eval(4, summary(0.52)) == []
    feed(monitors, range(5, 9), reward=0.6)
    alerts = monitors.observe_eval(8, summary(0.40))
    assert names(alerts) == ["overfitting"]
    assert (
        alerts[0].details["train_change"] == pytest.approx(0.3)
        and alerts[0].details["held_out_change"] == pytest.approx(-0.1)
    )
    # A held-out drop within its noise (s.e. 0.2 each) is not overfitting.
    noisy = make()
    noisy.observe_eval(0, summary(0.5, stderr=0.2))
    feed(noisy, range(1, 9), reward=lambda s: 0.3 if s <= 4 else 0.6)
    assert noisy.observe_eval(8, summary(0.4, stderr=0.2)) == []


def test_reward_hacking_signals() -> None:
    monitors = make()
    alerts = feed(monitors, range(1, 5))
    alerts += feed(
        monitors, range(5, 9),
        **{"completion/length/mean": 95.0, "completion/truncated_share": 0.6, "entropy": 0.1}
    )
    assert sorted(names(alerts)) == ["entropy_collapse", "length_drift", "truncation_jump"]
    by_name = {a.monitor: a for a in alerts}
    assert "40.0 -> 95.0 tokens" in by_name["length_drift"].message
    assert "0.05 -> 0.60" in by_name["truncation_jump"].message
    # Already at the limit from the start is not a drift.
    assert "length_drift" not in names(feed(make(), range(1, 9), **{"completion/length/mean": 99.0}))


def test_a_run_that_cannot_learn_is_reported_within_the_first_steps() -> None:
    # Every completion cut at the limit, every group's rewards equal (all 0): nothing to learn from.
    stuck = {
        "completion/truncated_share": 1.0, "groups/zero_variance_share": 1.0, "reward/correct/none_share": 0.0
    }
    monitors = make()
    assert monitors.observe_step(1, step_metrics(1, 0.0, **stuck)) == []  # one step may be bad luck
    alerts = monitors.observe_step(2, step_metrics(2, 0.0, **stuck))
    assert sorted(names(alerts)) == ["no_learning_signal", "truncation_saturated"]
    by_name = {a.monitor: a for a in alerts}
    assert "raise rollout.max_new_tokens" in by_name["truncation_saturated"].message
    assert "100-token limit" in by_name["truncation_saturated"].message
    assert "all advantages are 0" in by_name["no_learning_signal"].message
    assert monitors.observe_step(3, step_metrics(3, 0.0, **stuck)) == []  # fired once, not every step
    # A healthy step in between resets the count.
    healthy = make()
    feed(healthy, range(1, 2), **stuck)
    feed(healthy, range(2, 3), **{"completion/truncated_share": 0.3, "groups/zero_variance_share": 0.5})
    assert feed(healthy, range(3, 4), **stuck) == []


def test_a_reward_that_only_returns_none_is_reported_once() -> None:
    monitors = make()
    alerts = feed(
        monitors, range(1, 3), **{"reward/style_judge/none_share": 1.0, "reward/correct/none_share": 0.25}
    )
    assert names(alerts) == ["reward_not_applicable"] and alerts[0].step == 1
    assert alerts[0].details == {"reward": "style_judge"}


def test_one_component_rising_while_another_falls_is_flagged_and_judges_are_named() -> None:
    monitors = make()
    alerts = feed(monitors, range(1, 5), reward=0.8)
    alerts += feed(
        monitors, range(5, 9), reward=0.3, **{"reward/style_judge/mean": lambda s: 0.9 + NOISE[s % 4]}
    )
    assert names(alerts) == ["judge_rule_disagreement"]
    assert alerts[0].details == {
        "rising": "style_judge", "falling": "correct", "rise": pytest.approx(0.4), "fall": pytest.approx(-0.5)
    }
    rules = Monitors(MonitorConfig(window=2, judge_rewards=[]), window_steps=4, sigmas=2.0,
                     max_new_tokens=100,
                     reward_names=["correct", "style_judge"])
    alerts = feed(rules, range(1, 5), reward=0.8)
    alerts += feed(
        rules, range(5, 9), reward=0.3, **{"reward/style_judge/mean": lambda s: 0.9 + NOISE[s % 4]}
    )
    assert names(alerts) == ["component_divergence"]


def test_component_rising_while_held_out_falls() -> None:
    monitors = make()
    monitors.observe_eval(0, summary(0.6))
    feed(monitors, range(1, 5), reward=0.5)
    feed(monitors, range(5, 9), reward=0.5, **{"reward/style_judge/mean": lambda s: 0.9 + NOISE[s % 4]})
    alerts = monitors.observe_eval(8, summary(0.4))
    assert names(alerts) == ["component_divergence"]
    assert alerts[0].details["rising"] == "style_judge"


def test_slice_regression_while_the_average_improves() -> None:
    def sliced(total: float, easy: float, hard: float) -> dict:
        return summary(total, slices={"difficulty_level": {
            "easy": {"reward": {"mean": easy, "stderr": 0.03, "count": 50}},
            "hard": {"reward": {"mean": hard, "stderr": 0.03, "count": 50}},
        }})

    monitors = make()
    monitors.observe_eval(0, sliced(0.50, 0.70, 0.30))
    alerts = monitors.observe_eval(10, sliced(0.55, 0.95, 0.15))
    assert names(alerts) == ["slice_regression"]
    assert alerts[0].details["tag"] == "difficulty_level" and alerts[0].details["value"] == "hard"
    assert "0.300 -> 0.150" in alerts[0].message
    # Everything falling is not this monitor's business (overfitting or a bad run is).
    falling = make()
    falling.observe_eval(0, sliced(0.50, 0.70, 0.30))
    assert falling.observe_eval(10, sliced(0.40, 0.65, 0.15)) == []


def test_replay_restores_state_without_repeating_alerts(tmp_path: Path) -> None:
    first = make(tmp_path)
    metrics_rows = [{"step": s, **step_metrics(s, 0.5)} for s in range(1, 13)]
    for row in metrics_rows:
        first.observe_step(row["step"], row)
    assert names(first.alerts) == ["plateau"]
    resumed = make(tmp_path)
    resumed.replay(metrics_rows, [{"step": 0, **summary(0.5)}])
    assert len((tmp_path / ALERTS_NAME).read_text().splitlines()) == 1  # nothing written again
    assert len(resumed.windows) == 3 and len(resumed.evaluations) == 1
    assert feed(resumed, range(13, 17), reward=0.5) == []  # the plateau is still the same one


def test_disabled_monitors_stay_silent() -> None:
    assert feed(make(enabled=False), range(1, 13), reward=0.5) == []


def test_a_real_run_records_the_alerts_that_fire(tmp_path: Path, tiny_model_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A random tiny model never answers an addition (a plateau by definition) and never stops within its
    6 tokens: every completion is truncated, said from step 2."""
    from rft.config import load_config
    from rft.trainer import Trainer
    from tests.conftest import tiny_recipe

    monkeypatch.setenv("RFT_CACHE", str(tmp_path / "cache"))
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", training={"steps": 4},
                         monitors={"every": 2, "window": 1},
                         output={"report": False})
    Trainer(load_config(raw=recipe)).train()
    alerts = [json.loads(line) for line in (tmp_path / "run" / ALERTS_NAME).read_text().splitlines()]
    assert [(a["monitor"], a["step"]) for a in alerts] == [("truncation_saturated", 2), ("plateau", 4)]
    assert "monitor [plateau] step 4" in capsys.readouterr().out


def test_a_run_that_cannot_learn_says_so_at_start(tmp_path: Path, tiny_model_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """group_size 1 (every advantage 0) and more prompts a step than the data holds: one warning each."""
    from rft.config import load_config
    from rft.trainer import Trainer
    from tests.conftest import tiny_recipe

    monkeypatch.setenv("RFT_CACHE", str(tmp_path / "cache"))
    train = tmp_path / "two.jsonl"
    train.write_text('{"prompt": "What is 1 + 1?", "answer": 2}\n{"prompt": "What is 2 + 2?", "answer": 4}\n')
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", training={"steps": 2, "prompts_per_step": 6},
                         rollout={"group_size": 1}, output={"report": False}, algorithm={"preset": "grpo"},
                         eval={"before_training": False, "after_training": False})
    recipe["data"] = {"train": str(train)}
    with caplog.at_level("WARNING"):
        Trainer(load_config(raw=recipe)).train()
    warnings = [
        r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("rft")
    ]
    assert sum("group_size is 1" in w for w in warnings) == 1
    assert sum("prompts_per_step (6) exceeds the 2 training prompts" in w for w in warnings) == 1
    alerts = [
        json.loads(line)["monitor"] for line in (tmp_path / "run" / ALERTS_NAME).read_text().splitlines()
    ]
    assert "no_learning_signal" in alerts  # a group of one has no variance, at every step
