"""A checkpoint as a loadable model: projector weights + the config naming its base models + tokenizer and
feature-extractor settings + a model card. `load_trained` rebuilds the full ASR model from such a folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from tiny_audio.checkpoint import MODEL_CONFIG_FILE, PROJECTOR_FILE, model_card, write_model_files
from tiny_audio.config import Config
from tiny_audio.errors import UserError
from tiny_audio.model.asr import ASRModel


def export_model(directory: Path, *, model: ASRModel, config: dict[str, Any], step: int, metrics: dict) -> None:
    """Only the trained projector is saved; the frozen encoder and decoder are named by the config."""
    card = model_card(config=config, step=step, metrics=metrics)
    write_model_files(directory, projector=model.projector, config=config, card=card)
    model.prompt.tokenizer.save_pretrained(str(directory))
    model.feature_extractor.save_pretrained(str(directory))


def load_trained(directory: Path, *, device: torch.device, token: str | None = None) -> tuple[ASRModel, Config]:
    """Rebuild the ASR model a checkpoint folder describes and load its projector weights."""
    from tiny_audio.model.loading import build_model
    from tiny_audio.precision import Precision

    config_path, weights = directory / MODEL_CONFIG_FILE, directory / PROJECTOR_FILE
    for path in (config_path, weights):
        if not path.is_file():
            raise UserError(f"{directory} is not a tiny-audio checkpoint: {path.name} is missing")
    try:
        cfg = Config.model_validate(json.loads(config_path.read_text()))
    except ValidationError as exc:
        raise UserError(f"{config_path} is not a valid tiny-audio config: {exc.errors()[0]['msg']}") from None
    precision = Precision.resolve(cfg.training.precision, device_type=device.type)  # as the run trained
    model = build_model(cfg, device=device, frozen_dtype=precision.frozen_dtype, token=token)
    model.projector.load_state_dict(load_file(str(weights), device=str(device)))
    model.eval()
    return model, cfg
