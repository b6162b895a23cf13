"""Config -> a ready ASRModel: resolve where each part lives, load the frozen parts, build the projector."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from tiny_audio.assets import SCHEME as ASSET_SCHEME
from tiny_audio.config import Config
from tiny_audio.model.asr import ASRModel, PromptBuilder
from tiny_audio.model.augment import SpecAugment
from tiny_audio.model.encoder import TOWER_PREFIXES, load_encoder
from tiny_audio.model.lora import adapter_parameters, add_adapters
from tiny_audio.model.projectors import build_projector
from tiny_audio.model.sharding import full_numel, gathered


def resolve_model_path(
    ref: str, *, revision: str | None, token: str | None, only: tuple[str, ...] | None = None
) -> Path:
    """`asset://tiny/encoder` (shipped in the package), a local directory, or a Hub repo id -> a local directory.

    only: for a Hub repo, fetch just the tensors whose names start with these prefixes (an encoder's tower).
    """
    if ref.startswith(ASSET_SCHEME):
        from tiny_audio.assets import resolve_asset

        return Path(resolve_asset(ref))
    local = Path(ref).expanduser()
    if local.is_dir():
        return local
    from tiny_audio import hub  # all network I/O lives there

    if only:
        return hub.download_model_part(ref, prefixes=only, revision=revision, token=token)
    return hub.download_model(ref, revision=revision, token=token)


def load_tokenizer(path: Path, *, audio_token: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if audio_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([audio_token], special_tokens=True)
    return tokenizer


def embedding_rms(decoder: torch.nn.Module) -> float:
    """Typical RMS of the decoder's token embeddings: the scale audio embeddings should arrive at."""
    weight = decoder.get_input_embeddings().weight
    with gathered([weight]):  # under ZeRO-3 each rank holds only a slice of the table
        return float(weight.detach().float().pow(2).mean(dim=-1).sqrt().median())


def build_model(
    cfg: Config,
    *,
    device: torch.device,
    frozen_dtype: torch.dtype = torch.float32,
    token: str | None = None,
) -> ASRModel:
    """Load encoder + decoder (frozen, `frozen_dtype`) and build a fresh fp32 projector, all on `device`."""
    m = cfg.model
    encoder_path = resolve_model_path(
        m.encoder_id, revision=m.encoder_revision, token=token, only=TOWER_PREFIXES[m.encoder_type]
    )
    decoder_path = resolve_model_path(m.decoder_id, revision=m.decoder_revision, token=token)
    encoder, extractor = load_encoder(
        encoder_path, kind=m.encoder_type, attn_implementation=m.attn_implementation, dtype=frozen_dtype
    )
    tokenizer = load_tokenizer(decoder_path, audio_token=m.audio_token)
    decoder = AutoModelForCausalLM.from_pretrained(
        str(decoder_path), dtype=frozen_dtype, attn_implementation=m.attn_implementation
    )
    if cfg.lora.enabled:
        torch.manual_seed(cfg.training.seed)
        add_adapters(decoder, cfg.lora)
        for adapter in adapter_parameters(decoder):  # trained weights are fp32, as the projector's
            adapter.data = adapter.data.float()
    torch.manual_seed(cfg.training.seed)
    projector = build_projector(
        cfg.projector,
        in_dim=encoder.hidden_size,
        out_dim=decoder.get_input_embeddings().embedding_dim,
        target_rms=embedding_rms(decoder),
    )
    prompt = PromptBuilder(tokenizer=tokenizer, instruction=m.instruction, audio_token=m.audio_token)
    model = ASRModel(
        encoder=encoder,
        extractor=extractor,
        projector=projector,
        decoder=decoder,
        prompt=prompt,
        encoder_padding=m.encoder_padding,
        spec_augment=spec_augment(cfg),
    )
    return model.to(device)


def spec_augment(cfg: Config) -> SpecAugment | None:
    augment = cfg.data.spec_augment
    if not augment.enabled:
        return None
    return SpecAugment(
        time_masks=augment.time_masks,
        time_mask_frames=augment.time_mask_frames,
        freq_masks=augment.freq_masks,
        freq_mask_bins=augment.freq_mask_bins,
    )


def parameter_report(model: ASRModel) -> list[tuple[str, int, int]]:
    """(part, trainable, frozen) parameter counts, printed at start."""
    rows = []
    for name in ("encoder", "projector", "decoder"):
        params = list(getattr(model, name).parameters())
        sizes = [(full_numel(p), p.requires_grad) for p in params]
        trainable = sum(n for n, grad in sizes if grad)
        rows.append((name, trainable, sum(n for n, _ in sizes) - trainable))
    return rows
