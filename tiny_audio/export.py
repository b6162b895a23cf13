"""A checkpoint as a loadable model: projector weights + the config naming its base models + tokenizer and
feature-extractor settings + a model card, at the root of every checkpoint folder and of the Hub repo.
`load_trained` rebuilds the full ASR model from such a folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from tiny_audio.checkpoint.format import MODEL_CONFIG_FILE, PROJECTOR_FILE, RESUME_DIR, save_projector, write_json
from tiny_audio.config import Config
from tiny_audio.errors import UserError
from tiny_audio.model.asr import ASRModel
from tiny_audio.model.lora import ADAPTERS_FILE, adapter_parameters, has_adapters, load_adapters, save_adapters
from tiny_audio.model.sharding import gathered
from tiny_audio.redact import redact

log = logging.getLogger("tiny_audio")


def export_model(directory: Path, *, model: ASRModel, config: dict[str, Any], step: int, metrics: dict) -> None:
    """Only the trained weights are saved (the projector, and the decoder's LoRA adapters in the second stage);
    the frozen encoder and decoder are named by the config."""
    card = model_card(config=config, step=step, metrics=metrics)
    write_model_files(directory, projector=model.projector, config=config, card=card)
    if has_adapters(model.decoder):
        save_adapters(model.decoder, directory, Config.model_validate(config).lora)
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
    if cfg.lora.enabled:
        load_adapters(model.decoder, directory)
    model.eval()
    return model, cfg


def init_from_checkpoint(model: ASRModel, cfg: Config, *, token: str | None) -> None:
    """Load `training.init_from`'s projector (and its LoRA adapters, when it has them and this run has adapters)
    into a fresh run's model: the start of a second stage. Its models and projector shape must be this run's."""
    from tiny_audio.checkpoint.format import check_compatible
    from tiny_audio.inference import checkpoint_folder

    ref = cfg.training.init_from
    assert ref is not None
    with checkpoint_folder(ref, token=token) as folder:
        config_path, weights = folder / MODEL_CONFIG_FILE, folder / PROJECTOR_FILE
        for path in (config_path, weights):
            if not path.is_file():
                raise UserError(f"training.init_from={ref} is not a tiny-audio checkpoint: {path.name} is missing")
        stored = json.loads(config_path.read_text())
        stored["lora"] = cfg.to_dict()["lora"]  # a projector-only first stage may start a LoRA second stage
        check_compatible(stored=stored, current=cfg.to_dict(), where=f"training.init_from={ref}")
        device = next(model.projector.parameters()).device
        with gathered([*model.projector.parameters(), *adapter_parameters(model.decoder)], modifier_rank=0):
            model.projector.load_state_dict(load_file(str(weights), device=str(device)))
            adapters = has_adapters(model.decoder) and (folder / ADAPTERS_FILE).is_file()
            if adapters:
                load_adapters(model.decoder, folder)
    log.info("started from training.init_from=%s: its projector%s", ref, " and LoRA adapters" if adapters else "")


def write_model_files(
    directory: Path, *, projector: torch.nn.Module, config: dict[str, Any], card: str | None = None
) -> None:
    """Write the projector weights, the resolved (scrubbed) config and the model card README.md into `directory`.

    The tokenizer and the feature extractor settings (`save_pretrained`) are the caller's to add beside them.
    """
    directory.mkdir(parents=True, exist_ok=True)
    save_projector(projector, directory / PROJECTOR_FILE)
    write_json(directory / MODEL_CONFIG_FILE, redact(config))
    if card is not None:
        (directory / "README.md").write_text(redact(card))


def model_card(*, config: dict[str, Any], step: int, metrics: dict[str, float] | None = None) -> str:
    """A README.md for the repo root: what was trained (experiment, models, projector), at which step, how well."""
    model, projector, lora = config.get("model", {}), config.get("projector", {}), config.get("lora", {})
    stage = (
        f"Stage: projector + LoRA adapters on the decoder (rank {lora.get('rank')}, alpha {lora.get('alpha')}; "
        f"`{ADAPTERS_FILE}`)."
        if lora.get("enabled")
        else "Stage: projector only (the decoder is untouched)."
    )
    rows = "\n".join(f"| {name} | {value:.4g} |" for name, value in sorted((metrics or {}).items()))
    figures = f"| metric | value |\n|---|---|\n{rows}\n" if rows else "No evaluation yet.\n"
    return (
        "---\n"
        "library_name: tiny-audio\n"
        "tags: [automatic-speech-recognition, tiny-audio]\n"
        "pipeline_tag: automatic-speech-recognition\n"
        "---\n\n"
        f"# tiny-audio: {config.get('experiment', '?')}\n\n"
        f"A `{projector.get('type', '?')}` projector (stack {projector.get('stack', '?')}, hidden "
        f"{projector.get('hidden_dim', '?')}) between the frozen encoder `{model.get('encoder_id', '?')}` and the "
        f"frozen decoder `{model.get('decoder_id', '?')}`.\n\n{stage}\n\n"
        f"Step {step}.\n\n## Latest evaluation\n\n{figures}\n"
        f"`{PROJECTOR_FILE}` holds the projector weights, `{MODEL_CONFIG_FILE}` the resolved config; "
        f"`{RESUME_DIR}/` what resuming the run needs.\n"
    )
