"""The report of a real (tiny) run: written at the end of training, valid self-contained HTML with real
PNGs, rendered by a headless Chromium, summary.json, run comparisons and experiment trackers."""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from rft.config import ConfigError, load_config
from rft.report import SUMMARY_NAME, configure_parser, run, write_report
from tests.conftest import tiny_recipe

LENGTH_REWARD = '''
def text_length(completions, **_):
    texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
    return [min(len(text), 40) / 40 for text in texts]
'''
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
PLOT_BLUE = (31, 119, 180)  # matplotlib's first colour: only the plots use it on the page


def _recipe(root: Path, tiny_model_dir: Path, name: str, **sections) -> dict:
    (root / "length.py").write_text(LENGTH_REWARD)
    recipe = tiny_recipe(tiny_model_dir, root / name, **sections)
    recipe["rewards"] = [{"fn": f"{root / 'length.py'}:text_length", "version": "2024-06"}]
    return recipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Run `main` (4 steps, greedy + sampled evaluations every 2 steps, monitors, TensorBoard when
    installed), `rival` (same held-out data and rewards, another seed) and `other_data` (6 held-out rows)."""
    from rft.trainer import Trainer

    root = tmp_path_factory.mktemp("report-runs")
    evaluation = {"before_training": True, "after_training": True}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RFT_CACHE", str(root / "cache"))
        main = _recipe(
            root, tiny_model_dir, "main", training={"steps": 4, "learning_rate": 0.05},
            eval={**evaluation, "every": 2, "sampled": True, "samples_per_prompt": 2, "pass_k": [1, 2]},
            monitors={"every": 2, "window": 1},
            output={"trackers": ["tensorboard"] if HAS_TENSORBOARD else [], "log_completions": 2},
        )
        Trainer(load_config(raw=main)).train()
        rival = _recipe(root, tiny_model_dir, "rival", training={"steps": 2, "seed": 1},
                        eval={**evaluation, "sampled": True, "samples_per_prompt": 2, "pass_k": [1, 2]})
        Trainer(load_config(raw=rival)).train()
        other = _recipe(root, tiny_model_dir, "other_data", training={"steps": 1}, eval=evaluation,
                        data={"max_eval_rows": 6}, output={"report": False})
        Trainer(load_config(raw=other)).train()
    return {"main": root / "main", "rival": root / "rival", "other_data": root / "other_data"}


def test_training_writes_the_report_and_summary(runs: dict[str, Path]) -> None:
    run_dir = runs["main"]
    assert (run_dir / "report.html").is_file()
    summary = json.loads((run_dir / SUMMARY_NAME).read_text())
    assert summary["steps_completed"] == 4 and summary["steps_planned"] == 4
    assert summary["plots"] == sorted(["reward", "components", "lengths", "clip", "kl_entropy", "time"])
    held_out = summary["held_out"]
    evaluations = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    greedy = [e for e in evaluations if e["mode"] == "greedy"]
    # base, every 2 steps (the last one is also "after training")
    assert [e["step"] for e in greedy] == [0, 2, 4]
    assert (held_out["before"]["mean"], held_out["after"]["mean"]) == (greedy[0]["mean"], greedy[-1]["mean"])
    assert held_out["change"] == pytest.approx(greedy[-1]["mean"] - greedy[0]["mean"])
    assert held_out["significant"] == (abs(held_out["z"]) > 2)
    # Before / after per slice for both passes; pass@k only where it was measured (sampled).
    sampled_metrics = {row["metric"] for row in summary["before_after"]["sampled"]}
    assert {"reward", "pass@1", "pass@2"} <= sampled_metrics
    assert "pass@1" not in {row["metric"] for row in summary["before_after"]["greedy"]}
    slices = {row["value"] for row in summary["before_after"]["greedy"] if row["tag"] == "phrasing"}
    assert slices == {"what_is", "compute", "sum_of"}
    alerts = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    assert summary["alerts"] == alerts
    assert summary["fingerprints"]["rewards"][0]["version"] == "2024-06"


class StrictHTML(HTMLParser):
    """Checks that every opened element is closed in order, and collects images and external links."""

    VOID = frozenset({"meta", "img", "br", "hr", "link", "input"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        for key in ("src", "href"):
            if values.get(key) and not values[key].startswith("data:"):
                self.external.append(values[key])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_report_is_valid_self_contained_html_with_real_pngs(runs: dict[str, Path]) -> None:
    page = (runs["main"] / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    parser = StrictHTML()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    assert parser.external == []  # nothing to fetch: the page works offline and as an attachment
    summary = json.loads((runs["main"] / SUMMARY_NAME).read_text())
    assert len(parser.images) == len(summary["plots"]) == 6
    for source in parser.images:
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix)
        image = Image.open(io.BytesIO(base64.b64decode(source[len(prefix):])))
        assert image.format == "PNG" and image.width > 300 and image.height > 200
    text = " ".join(parser.text)
    for expected in ("Monitors", "Before and after, per slice", "phrasing = compute", "pass@2",
                     "Sampled completions",
                     "Training samples, first step (1)", "Training samples, last step (4)", "text_length",
                     "2024-06"):
        assert expected in text, expected
    for alert in summary["alerts"]:
        assert alert["message"] in text


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="chromium not installed (apt-get install chromium)"
)
def test_report_renders_in_headless_chromium(runs: dict[str, Path], tmp_path: Path) -> None:
    screenshot = tmp_path / "report.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={screenshot}", "--window-size=1200,2400",
         (runs["main"] / "report.html").resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    pixels = np.asarray(Image.open(screenshot).convert("RGB"), dtype=np.int16)
    assert pixels.shape == (2400, 1200, 3)
    # Plot lines are drawn in matplotlib's blue, which nothing else on the page uses: finding it means
    # the embedded PNGs were decoded and painted, not shown as broken images.
    blue = int((np.abs(pixels - np.array(PLOT_BLUE)).max(axis=-1) <= 12).sum())
    assert blue > 500


def _report_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(list(argv))


def test_rft_report_compares_runs_only_where_it_means_something(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(_report_args(str(runs["main"]), "--compare", str(runs["rival"]), str(runs["other_data"])))
    assert code == 0
    assert f"report: {runs['main'] / 'report.html'}" in capsys.readouterr().out
    comparisons = json.loads((runs["main"] / SUMMARY_NAME).read_text())["comparisons"]
    rival, other = comparisons
    assert rival["comparable"] is True
    assert rival["difference"] == pytest.approx(rival["this_final"]["mean"] - rival["their_final"]["mean"])
    assert rival["significant"] == (abs(rival["z"]) > 2)
    assert other == {
        "run_dir": str(runs["other_data"]), "name": "run", "comparable": False,
        "reasons": ["different held-out data"]
    }
    assert "not comparable: different held-out data" in (runs["main"] / "report.html").read_text()


def test_report_of_a_run_without_evaluations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump({"output": {"name": "killed"}, "training": {"steps": 10}})
    )
    rows = [
        {"step": s, "reward/mean": 0.1 * s, "completion/length/mean": 5.0, "time/step": 1.0} for s in (1, 2)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    page = write_report(run_dir).read_text()
    assert "No greedy held-out evaluation both before and after training" in page
    assert json.loads((run_dir / SUMMARY_NAME).read_text())["steps_completed"] == 2
    assert run(_report_args(str(tmp_path))) == 2
    assert "not an rft run directory" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard not installed")
def test_tensorboard_receives_training_and_evaluation_metrics(runs: dict[str, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_dir,) = {
        p.parent for p in (runs["main"] / "trackers").rglob("events.out.tfevents.*") if p.parent.name == "run"
    }
    events = EventAccumulator(str(events_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/greedy/reward")] == [0, 2, 4]
    assert [e.step for e in events.Scalars("eval/sampled/pass@2")] == [0, 2, 4]


def test_a_tracker_that_is_not_installed_fails_before_the_model_loads(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from rft.tracking import check_trackers

    missing = next(
        name for name in ("wandb", "mlflow", "aim", "swanlab") if importlib.util.find_spec(name) is None
    )
    with pytest.raises(
        ConfigError, match=rf"output.trackers: \['{missing}'\] not installed \(pip install {missing}\)"
    ):
        check_trackers([missing])
    from rft.trainer import Trainer

    recipe = tiny_recipe(tmp_path / "no-such-model", tmp_path / "run", output={"trackers": [missing]})
    with pytest.raises(ConfigError, match="not installed"):
        Trainer(load_config(raw=recipe))


def test_an_agent_sample_shows_the_whole_conversation() -> None:
    from rft.report_page import Sample

    call = '<tool_call>{"name": "calculate", "arguments": {"expression": "2 + 3"}}</tool_call>'
    conversation = [
        {"role": "assistant", "content": call, "tool_calls": [{"type": "function", "function": {
            "name": "calculate", "arguments": {"expression": "2 + 3"}}}]},
        {"role": "tool", "name": "calculate", "content": "5"},
        {"role": "assistant", "content": "5"},
    ]
    sample = Sample.of({"prompt": [{"role": "user", "content": "2 + 3?"}], "completion": conversation,
                        "reward": 1.0})
    assert sample.completion == f"assistant: {call}\ntool: 5\nassistant: 5"
    answer = [{"role": "assistant", "content": "5"}]
    single = Sample.of({"prompt": "2 + 3?", "completion": answer, "reward": 1})
    assert single.completion == "5"
