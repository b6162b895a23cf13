"""FLOPs per sample at the real sizes, and the time 20,000 steps would take on an A40 and an H100 at a given
fraction of their bf16 peak (from the published model configs)."""

from __future__ import annotations

import math

import numpy as np

from tiny_audio.model.asr import ASRModel
from tools.bench.workload import GPU_PEAK_FLOPS, MAX_SECONDS, REAL_06B, REAL_17B, Clip, Sizes, sample_seconds


# -- FLOPs at the real sizes ---------------------------------------------------------------------------------------
def encoder_layer_weights(s: Sizes) -> int:
    """Matrix weights of one encoder layer: q, k, v, o projections and the two MLP matrices."""
    return 4 * s.enc_dim * s.enc_dim + 2 * s.enc_dim * s.enc_ffn


def decoder_layer_weights(s: Sizes) -> int:
    """Matrix weights of one Qwen3 layer: q, k, v, o (grouped KV heads) and the gated MLP's three matrices."""
    q, kv = s.dec_heads * s.dec_head_dim, s.dec_kv_heads * s.dec_head_dim
    return 2 * s.dec_dim * q + 2 * s.dec_dim * kv + 3 * s.dec_dim * s.dec_ffn


def sample_flops(s: Sizes, *, seconds: float, label_tokens: float, prompt_tokens: int, naive: bool) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one training sample: frozen encoder forward, projector forward and
    backward, frozen decoder forward and activation-only backward (no weight gradients), LM head where logits are
    taken (label positions; every position for the naive step)."""
    seconds = MAX_SECONDS if naive else seconds
    t_mel, t_enc = 100 * seconds, 50 * seconds
    d = s.enc_dim
    encoder = 2 * t_mel * s.n_mels * 3 * d + 2 * t_enc * 3 * d * d  # the two convolutions
    encoder += s.enc_layers * (2 * t_enc * encoder_layer_weights(s) + 4 * t_enc * t_enc * d)
    audio_tokens = math.floor(t_enc / s.stack)
    projector = 3 * 2 * audio_tokens * (s.stack * d * s.proj_hidden + s.proj_hidden * s.dec_dim)
    length = prompt_tokens + audio_tokens + label_tokens
    h, q = s.dec_dim, s.dec_heads * s.dec_head_dim
    dense = 2 * length * decoder_layer_weights(s)
    attention = 2 * length * length * q  # causal: half of QK^T and AV over all pairs
    head = 2 * h * s.vocab * (length if naive else label_tokens)
    decoder_fwd = s.dec_layers * (dense + attention) + head
    decoder_bwd = s.dec_layers * (dense + 2 * attention) + head  # gradients for activations only
    return {
        "encoder": encoder,
        "projector": projector,
        "decoder_fwd": decoder_fwd,
        "decoder_bwd": decoder_bwd,
        "total": encoder + projector + decoder_fwd + decoder_bwd,
    }


def real_projection(*, steps: int, batch_size: int, utilisation: float, seed: int) -> dict[str, dict[str, float]]:
    """Mean FLOPs per sample over the length distribution, and the time of `steps` steps of `batch_size` clips."""
    seconds = sample_seconds(20_000, rng=np.random.default_rng(seed))
    # Qwen3's tokenizer: ~1.3 tokens per English word, +1 end of turn; its chat prompt around the audio: ~15 tokens.
    out = {}
    for model_name, sizes in (("qwen3-0.6b", REAL_06B), ("qwen3-1.7b", REAL_17B)):
        for path in ("fast", "naive"):
            flops = [
                sample_flops(sizes, seconds=s, label_tokens=1.3 * 2.5 * s + 1, prompt_tokens=15, naive=path == "naive")
                for s in seconds
            ]
            mean = {k: float(np.mean([f[k] for f in flops])) for k in flops[0]}
            row = {f"{k}_gflops_per_sample": v / 1e9 for k, v in mean.items()}
            for gpu, peak in GPU_PEAK_FLOPS.items():
                row[f"{gpu}_hours"] = steps * batch_size * mean["total"] / (peak * utilisation) / 3600
            out[f"{model_name}/{path}"] = row
    return out


# -- report --------------------------------------------------------------------------------------------------------
def bench_flops(model: ASRModel, sizes: Sizes, batches: list[list[Clip]], *, naive: bool) -> float:
    """Model FLOPs per sample of the benchmark's own model on its timed clips (for the achieved FLOP/s)."""
    prompt_tokens = len(model.prompt.prefix) + len(model.prompt.suffix)
    flops = [
        sample_flops(
            sizes,
            seconds=c.seconds,
            label_tokens=model.prompt.count_label_tokens(c.text),
            prompt_tokens=prompt_tokens,
            naive=naive,
        )["total"]
        for b in batches[1:]
        for c in b
    ]
    return float(np.mean(flops))
