from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rft.config import PRESETS, ConfigError, dump_config, load_config, recipe_warnings

REPO = Path(__file__).resolve().parent.parent


def minimal(**extra) -> dict:
    return {
        "data": {"train": "rows.jsonl"}, "rewards": [{"fn": "rewards/arithmetic.py:final_number_correct"}],
        **extra,
    }


def test_quickstart_recipe_loads_and_resolves_paths() -> None:
    config = load_config(REPO / "recipes" / "quickstart.yaml")
    assert Path(config.data.train).is_file()
    assert Path(config.rewards[0].fn.rsplit(":", 1)[0]).is_file()


def test_override_parses_yaml_types() -> None:
    config = load_config(
        raw=minimal(), overrides=["algorithm.eps_high=0.28", "lora.enabled=false", "rewards.0.weight=2"]
    )
    assert config.algorithm.eps_high == 0.28
    assert config.lora.enabled is False
    assert config.rewards[0].weight == 2.0


def test_misspelt_field_is_named() -> None:
    with pytest.raises(ConfigError, match=r"algorithm\.eps_hihg: unknown field"):
        load_config(raw=minimal(algorithm={"eps_hihg": 0.3}))


def test_bad_choice_lists_allowed_values() -> None:
    with pytest.raises(
        ConfigError, match=r"algorithm\.loss_agg: got 'token_mean'.*'seq-mean-token-mean'.*'token-mean'"
    ):
        load_config(raw=minimal(algorithm={"loss_agg": "token_mean"}))


def test_ill_typed_field_is_named(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(minimal(training={"steps": "many"})))
    with pytest.raises(ConfigError, match=rf"{path}: training\.steps: "):
        load_config(path)


def test_preset_fills_unset_fields_and_explicit_fields_win() -> None:
    config = load_config(raw=minimal(algorithm={"preset": "dapo", "eps_high": 0.3}))
    assert config.algorithm.loss_agg == "token-mean"
    assert config.algorithm.dynamic_sampling is True
    assert config.algorithm.eps_high == 0.3
    gspo = load_config(raw=minimal(algorithm={"preset": "gspo"})).algorithm
    assert (gspo.importance_sampling_level, gspo.eps_low, gspo.eps_high) == ("sequence", 3e-4, 4e-4)
    assert set(PRESETS) == {"grpo", "dapo", "gspo", "dr_grpo"}


def test_resolved_config_round_trips() -> None:
    config = load_config(raw=minimal(algorithm={"preset": "dr_grpo"}))
    dumped = yaml.safe_load(dump_config(config))
    assert dumped["algorithm"]["loss_agg"] == "seq-mean-token-sum-norm"
    assert load_config(raw=dumped) == config


def test_inconsistent_options_rejected() -> None:
    with pytest.raises(ConfigError, match="scale: none"):
        load_config(raw=minimal(algorithm={"advantage": "dr_grpo", "scale": "group"}))
    with pytest.raises(ConfigError, match="group_size >= 2"):
        load_config(raw=minimal(algorithm={"dynamic_sampling": True}, rollout={"group_size": 1}))


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(raw=minimal(), overrides=["algorithm.eps_high"])


@pytest.mark.parametrize(("override", "message"), [
    (
        "rewards.5.weight=2",
        r"--set 'rewards.5.weight=2': position 5 is past the end of a list of 1 \(use 0 to 0\)"
    ),
    ("rewards.x.weight=2", r"'x' is not a position in a list of 1"),
    ("rewards.3=x", r"position 3 is past the end"),
    (
        "training.steps=[1",
        r"--set 'training.steps=\[1': the value is not valid YAML .*; quote it as a string"
    ),
])
def test_bad_override_is_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(raw=minimal(), overrides=[override])
    assert "\n" not in str(raised.value)


def test_relative_paths_resolve_against_the_recipe_folder_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe_dir, working_dir = tmp_path / "recipes", tmp_path / "work"
    for folder, rows in ((recipe_dir, 108), (working_dir, 4)):
        (folder / "data").mkdir(parents=True)
        (folder / "data" / "train.jsonl").write_text('{"prompt": "p"}\n' * rows)
    (working_dir / "only_here.jsonl").write_text('{"prompt": "p"}\n')
    (recipe_dir / "reward.py").write_text("def r(completions, **kw):\n    return [0.0] * len(completions)\n")
    recipe = recipe_dir / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "data": {"train": "data/train.jsonl", "eval": "only_here.jsonl"},
        "rewards": [
            {"fn": "reward.py:r", "kwargs": {"answer_column": "data"}}, {"fn": "rewards.maths:math_answer"}
        ],
    }))
    monkeypatch.chdir(working_dir)
    config = load_config(recipe)
    # The recipe's data, not the working folder's file of the same name; recorded absolute.
    assert config.data.train == str((recipe_dir / "data" / "train.jsonl").resolve())
    # found only here: the fallback
    assert config.data.eval == str((working_dir / "only_here.jsonl").resolve())
    assert config.rewards[0].fn == f"{(recipe_dir / 'reward.py').resolve()}:r"
    # a column name, though a folder has that name
    assert config.rewards[0].kwargs == {"answer_column": "data"}
    assert config.rewards[1].fn == "rewards.maths:math_answer"
    dumped = yaml.safe_load(dump_config(config))
    assert Path(dumped["data"]["train"]).is_absolute() and Path(dumped["data"]["eval"]).is_absolute()


def test_recipe_warnings_name_what_cannot_learn() -> None:
    config = load_config(raw=minimal(rollout={"group_size": 1}, training={"prompts_per_step": 500}))
    warnings = recipe_warnings(config, train_rows=3)
    assert len(warnings) == 2
    assert "group_size is 1" in warnings[0] and "nothing is learned" in warnings[0]
    assert (
        "prompts_per_step (500) exceeds the 3 training prompts" in warnings[1] and "167 times" in warnings[1]
    )
    assert recipe_warnings(load_config(raw=minimal()), train_rows=100) == []


def test_a_rounds_sampling_seed_depends_only_on_its_parts() -> None:
    from rft.sampling import SamplingSettings, derived_seed

    sampling = SamplingSettings(max_new_tokens=8)
    seeded = sampling.seeded(0, 16, 2)
    assert seeded.seed == derived_seed(0, 16, 2) == sampling.seeded(0, 16, 2).seed  # the same in any run
    assert len({derived_seed(0, position, 0) for position in range(0, 4096, 2)}) == 2048
    assert 0 <= seeded.seed < 2**31 and seeded.max_new_tokens == 8
    greedy = SamplingSettings(max_new_tokens=8, greedy=True)
    assert greedy.seeded(0, 16, 2) is greedy  # greedy decoding draws nothing
