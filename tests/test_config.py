from pathlib import Path

import pytest

from tiny_audio.config import EXPERIMENTS_DIR
from tiny_audio.errors import ConfigError
from tiny_audio.experiments import available_experiments, load_config, parse_override


@pytest.mark.parametrize("name", available_experiments())
def test_every_shipped_experiment_validates(name: str) -> None:
    cfg = load_config(name)
    assert cfg.experiment == name


def test_shipped_experiments_are_the_course_ones() -> None:
    assert {"mlp", "mosa", "moe", "tiny"} <= set(available_experiments())
    assert load_config("mlp").model.decoder_id == "Qwen/Qwen3-0.6B"
    assert load_config("mlp").model.encoder_id == "zai-org/GLM-ASR-Nano-2512"
    assert load_config("moe").projector.type == "moe"


def test_course_workflow_copy_and_set_hub_model_id(tmp_path: Path) -> None:
    text = (EXPERIMENTS_DIR / "mlp.yaml").read_text()
    mine = tmp_path / "my_experiment.yaml"
    mine.write_text(text.replace("hub_model_id: null", 'hub_model_id: "me/tiny-audio-me"'))
    cfg = load_config(str(mine))
    assert cfg.experiment == "my_experiment"
    assert cfg.training.hub_model_id == "me/tiny-audio-me"


def test_overrides_are_typed() -> None:
    cfg = load_config("tiny", ["training.learning_rate=3e-4", "training.max_steps=7", "data.shuffle=false"])
    assert cfg.training.learning_rate == pytest.approx(3e-4)
    assert cfg.training.max_steps == 7
    assert cfg.data.shuffle is False


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.lr=1", "unknown key 'training.lr'"),
        ("training.max_steps=abc", "training.max_steps"),
        ("projector.type=transformer", "must be 'mlp', 'mosa' or 'moe'"),
        ("training.max_steps=0", "greater than or equal to 1"),
        ("bogus=1", "unknown key 'bogus'"),
        ("training.max_steps", "section.key=value"),
    ],
)
def test_bad_overrides_name_the_problem(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config("tiny", [override])


def test_unknown_key_in_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rat: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'training.learning_rat' in .*bad.yaml.*learning_rate"):
        load_config(str(bad))


def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_unknown_experiment_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown experiment 'nope'.*mlp.*tiny"):
        load_config("nope")


def test_moe_top_k_cannot_exceed_experts() -> None:
    with pytest.raises(ConfigError, match="top_k"):
        load_config("moe", ["projector.top_k=5"])


def test_parse_override_reads_yaml_values() -> None:
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=null") == (["a", "b"], None)
    assert parse_override("a.b=hello") == (["a", "b"], "hello")


def test_shipped_deepspeed_configs_are_json_of_their_stage() -> None:
    import json

    from tiny_audio.config import DEEPSPEED_DIR

    for stage in (1, 2, 3):
        ds = json.loads((DEEPSPEED_DIR / f"zero{stage}.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage
        assert load_config("tiny", [f"training.deepspeed=zero{stage}"]).training.deepspeed == f"zero{stage}"


def test_new_hub_and_training_keys_validate() -> None:
    cfg = load_config("tiny", ["hub.retry_attempts=3", "hub.retry_initial_s=0.5", "hub.retry_max_s=10"])
    assert (cfg.hub.retry_attempts, cfg.hub.retry_initial_s, cfg.hub.retry_max_s) == (3, 0.5, 10)
    with pytest.raises(ConfigError, match="retry_attempts"):
        load_config("tiny", ["hub.retry_attempts=0"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config("tiny", ["training.deepspeed=zero4"])
