"""LoRA adapters on the frozen decoder: the course's second stage trains them together with the projector.

peft injects the adapters into the decoder in place (`inject_adapter_in_model`), so the decoder stays the same
transformers class, its own weights stay frozen and only the adapters' low-rank matrices train. Their weights are
saved apart from the projector's (`adapters.safetensors`, in peft's own key names) with the peft config beside
them (`adapter_config.json`), so peft can load them onto the base decoder too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from tiny_audio.config import LoraConfig
from tiny_audio.errors import UserError

ADAPTERS_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def add_adapters(decoder: nn.Module, cfg: LoraConfig) -> None:
    """Inject LoRA adapters into `decoder`'s target projections (trainable; everything else stays frozen)."""
    peft_config = peft_lora_config(cfg)
    inject_adapter_in_model(peft_config, decoder)


def peft_lora_config(cfg: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules)
    )


def adapter_parameters(decoder: nn.Module | None) -> list[nn.Parameter]:
    return [] if decoder is None else [p for name, p in decoder.named_parameters() if "lora_" in name]


def has_adapters(decoder: nn.Module) -> bool:
    return any("lora_" in name for name, _ in decoder.named_parameters())


def save_adapters(decoder: nn.Module, directory: Path, cfg: LoraConfig | None = None) -> None:
    """`adapters.safetensors` (each tensor copied out: ZeRO keeps parameters as views of one buffer) and, given
    `cfg`, the peft config that describes them (`adapter_config.json`, for peft users of an exported model)."""
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(decoder).items()}
    save_file(state, str(directory / ADAPTERS_FILE), metadata={"format": "pt"})
    if cfg is not None:
        config = peft_lora_config(cfg).to_dict()
        config["target_modules"] = sorted(config["target_modules"])
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        (directory / ADAPTER_CONFIG_FILE).write_text(text + "\n")


def load_adapters(decoder: nn.Module, directory: Path) -> None:
    """Copy the adapters saved in `directory` into `decoder`'s (which must have the same ones); UserError if not."""
    path = directory / ADAPTERS_FILE
    if not path.is_file():
        raise UserError(f"{directory} holds no LoRA adapters ({ADAPTERS_FILE}), but lora.enabled is set")
    state = load_file(str(path))
    with torch.no_grad():
        result = set_peft_model_state_dict(decoder, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
    if unexpected or missing:
        raise UserError(
            f"{path} does not fit this decoder's adapters (missing {missing[:3]}, unexpected {unexpected[:3]}): "
            "lora.rank and lora.target_modules must be those it was trained with"
        )
