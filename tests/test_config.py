import pytest

from segrl.cli import _split_overrides
from segrl.configs import ConfigError, SegrlConfig, describe, load_config


def test_defaults_are_trl_like():
    c = load_config()
    assert c.train.algo == "grpo" and c.train.loss_type == "dapo" and c.train.scale_rewards == "group"
    assert c.train.beta == 0.0 and c.train.epsilon == 0.2 and c.train.epsilon_high is None


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rate: 1.0e-5\n  num_generations: 4\nsampling:\n  temperature: 0.7\n")
    c = load_config(p, {"train.num_generations": "6", "sampling.stop_strings": "a,b"})
    assert c.train.learning_rate == 1e-5
    assert c.train.num_generations == 6  # the command line wins
    assert c.sampling.temperature == 0.7
    assert c.sampling.stop_strings == ["a", "b"]


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"train.lr": "1"}, "train.lr"),
        ({"train.epsilon": "abc"}, "train.epsilon"),
        ({"train.epsilon": "1.5"}, "train.epsilon"),
        ({"train.loss_type": "ppo"}, "train.loss_type"),
        ({"train.num_generations": "1"}, "train.num_generations"),
        ({"train.max_steps": "2.5"}, "train.max_steps"),
        ({"sampling.temperature": "0"}, "sampling.temperature"),
        ({"eval.num_samples": "0"}, "eval.num_samples"),
        ({"log.report_to": "wandb"}, "log.report_to"),
        ({"nosuch.field": "1"}, "nosuch"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=overrides)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    q = tmp_path / "bad.yaml"
    q.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(q)


def test_cli_override_parsing():
    got = _split_overrides(["--train.learning_rate", "1e-5", "--algo=rloo", "--train.epsilon_high", "0.28", "--eval.temperature", "-1"])
    assert got == {"train.learning_rate": "1e-5", "train.algo": "rloo", "train.epsilon_high": "0.28", "eval.temperature": "-1"}
    with pytest.raises(SystemExit):
        _split_overrides(["--train.learning_rate"])
    with pytest.raises(SystemExit):
        _split_overrides(["--nodot", "1"])


def test_every_field_is_documented():
    rows = describe(SegrlConfig)
    missing = [name for name, _, _, help_ in rows if not help_]
    assert not missing, missing
