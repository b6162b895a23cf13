"""Secrets leave logs and saved files; settings, even those named like tokens, stay exactly as they were."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_checkpoint import TOKEN, Run

from tiny_audio.checkpoint import MODEL_CONFIG_FILE, RESUME_DIR, CheckpointStore
from tiny_audio.config import HubConfig
from tiny_audio.experiments import available_experiments, load_config
from tiny_audio.redact import RedactFilter, is_secret_key, redact


def test_keys_that_name_a_secret_are_hidden_and_settings_are_not() -> None:
    clean = redact({"hf_token": "abc", "WANDB_API_KEY": "k", "max_new_tokens": 128, "data": {"token": "x"}})
    assert clean == {
        "hf_token": "<redacted>",
        "WANDB_API_KEY": "<redacted>",
        "max_new_tokens": 128,
        "data": {"token": "<redacted>"},
    }
    for secret in ("HF_TOKEN", "token", "RUNPOD_API_KEY", "apikey", "password", "client_secret", "Authorization"):
        assert is_secret_key(secret), secret
    for setting in ("audio_token", "pad_token", "eos_token", "max_label_tokens", "tokenizer", "tokens_per_s"):
        assert not is_secret_key(setting), setting


def test_known_values_and_hub_shaped_tokens_are_hidden_anywhere() -> None:
    assert redact({"HF_TOKEN": "abc", "a": [f"x {TOKEN} y"], "n": 1}) == {
        "HF_TOKEN": "<redacted>",
        "a": ["x <redacted> y"],
        "n": 1,
    }
    assert redact("secret s3cr3t here", secrets=["s3cr3t"]) == "secret <redacted> here"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "token=%s", ("s3cr3t",), None)
    RedactFilter(secrets=["s3cr3t"]).filter(record)
    assert record.getMessage() == "token=<redacted>"


@pytest.mark.parametrize("experiment", available_experiments())
def test_every_shipped_config_passes_through_unchanged(experiment: str) -> None:
    config = load_config(experiment).to_dict()
    assert redact(config, secrets=[TOKEN]) == config


def test_a_saved_checkpoint_keeps_every_setting(tmp_path: Path) -> None:
    run = Run()
    run.config["model"]["audio_token"] = "<audio>"
    store = CheckpointStore(backend=None, output_dir=tmp_path, keep=2, hub=HubConfig())
    path = run.save(store, step=1)
    for saved in (path / RESUME_DIR / "config.json", path / MODEL_CONFIG_FILE):
        assert json.loads(saved.read_text()) == run.config, saved
