"""Training-step benchmark: where a step's time goes, against the irreducible work and a naive baseline.

    python -m tiny_audio.bench.step                  # CPU-friendly defaults, real 151,936-token vocabulary
    python -m tiny_audio.bench.step --batch-size 8 --json-out step.json   # the experiments' batch (naive: ~11 GB)

Models are built from configs with random weights (nothing is downloaded): a GLM-ASR encoder and a Qwen3 decoder
at about a quarter of the real widths and depths (GLM-ASR-Nano tower: 32 layers x 1280; Qwen3-0.6B: 28 x 1024),
the real vocabulary, the projector of `--projector`. Clips follow a realistic length distribution (2-30 s, mean
~10 s, ~2.5 words/s). Two ways to train are timed side by side on batches from the same clips:

- fast: the project's path (`ASRModel`): duration-bucketed batches padded to their longest clip, log-mel on the
  device, encoder under inference mode on real lengths, logits and cross-entropy at label positions only;
- naive: every clip padded to 30 s (375 audio tokens each), no bucketing, logits at every decoder position.

A last section times the projectors alone, side by side: forward + backward of mlp (1280 -> 1024), mosa and moe
(1280 -> 2048) at the course's real sizes (12.6M, 118.1M and 183.6M parameters) on a bucketed batch of the same
realistic lengths, with their parameters and peak memory (`--projector-widths`).

"Irreducible" is the encoder forward plus the decoder forward/backward (activation gradients only, logits at label
positions) on the same batch, timed in isolation with plain calls. FLOPs per sample at the real sizes and the
projected time of 20,000 steps on an A40 and an H100 come from the published model configs (see REAL_* below).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn import functional as F
from transformers import (
    GlmAsrEncoder,
    GlmAsrEncoderConfig,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
    WhisperFeatureExtractor,
)

from tiny_audio.assets import resolve_asset
from tiny_audio.config import ProjectorConfig
from tiny_audio.data.batching import Batch, bucket, collate
from tiny_audio.model.asr import IGNORE, LOSS_CHUNK, ASRModel, LinearCrossEntropy, PromptBuilder
from tiny_audio.model.encoder import AudioEncoder
from tiny_audio.model.loading import embedding_rms, load_tokenizer
from tiny_audio.model.projectors import build_projector
from tools.miniatures import grammar

SAMPLE_RATE = 16_000
MAX_SECONDS = 30.0
PHASES = ("data", "features", "encoder", "projector", "decoder_fwd", "decoder_bwd", "optimizer")


# -- sizes ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    enc_dim: int
    enc_layers: int
    enc_heads: int
    enc_ffn: int
    dec_dim: int
    dec_layers: int
    dec_heads: int
    dec_kv_heads: int
    dec_head_dim: int
    dec_ffn: int
    vocab: int
    proj_hidden: int
    stack: int = 4
    n_mels: int = 128


# Published configs (hard-coded so nothing is downloaded):
# - zai-org/GLM-ASR-Nano-2512 audio tower = transformers' GlmAsrEncoderConfig defaults: 32 layers, hidden 1280,
#   20 heads, intermediate 5120, 128 mel bins, conv stride 2 (50 Hz);
# - Qwen/Qwen3-0.6B config.json: hidden 1024, 28 layers, 16 heads / 8 KV heads, head_dim 128, intermediate 3072,
#   vocab 151936; Qwen/Qwen3-1.7B config.json: hidden 2048, intermediate 6144, otherwise the same;
# - projector: the mlp experiment (stack 4, hidden 2048).
REAL_06B = Sizes(1280, 32, 20, 5120, 1024, 28, 16, 8, 128, 3072, 151_936, 2048)
REAL_17B = Sizes(1280, 32, 20, 5120, 2048, 28, 16, 8, 128, 6144, 151_936, 2048)
# Peak dense bf16 tensor throughput from NVIDIA's datasheets (A40: 149.7 TFLOPS; H100 SXM5: 989 TFLOPS).
GPU_PEAK_FLOPS = {"A40": 149.7e12, "H100 SXM": 989e12}
BENCH_DEFAULT = Sizes(320, 8, 5, 1280, 256, 7, 4, 2, 64, 768, 151_936, 512)


def build_model(sizes: Sizes, *, projector: str, device: torch.device, dtype: torch.dtype, seed: int) -> ASRModel:
    """An ASRModel with random frozen parts built from configs, the tiny asset tokenizer and a fresh projector."""
    torch.manual_seed(seed)
    tower = GlmAsrEncoder(
        GlmAsrEncoderConfig(
            hidden_size=sizes.enc_dim,
            num_hidden_layers=sizes.enc_layers,
            num_attention_heads=sizes.enc_heads,
            num_key_value_heads=sizes.enc_heads,
            intermediate_size=sizes.enc_ffn,
            num_mel_bins=sizes.n_mels,
            attn_implementation="sdpa",
        )
    ).to(dtype)
    encoder = AudioEncoder(tower=tower, kind="glmasr", attn_implementation="sdpa")
    decoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=sizes.vocab,
            hidden_size=sizes.dec_dim,
            num_hidden_layers=sizes.dec_layers,
            num_attention_heads=sizes.dec_heads,
            num_key_value_heads=sizes.dec_kv_heads,
            head_dim=sizes.dec_head_dim,
            intermediate_size=sizes.dec_ffn,
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
    ).to(dtype)
    tokenizer = load_tokenizer(resolve_asset("asset://tiny/decoder"), audio_token="<audio>")
    prompt = PromptBuilder(tokenizer=tokenizer, instruction="Transcribe the audio.", audio_token="<audio>")
    proj = build_projector(
        ProjectorConfig(type=projector, stack=sizes.stack, hidden_dim=sizes.proj_hidden),
        in_dim=sizes.enc_dim,
        out_dim=sizes.dec_dim,
        target_rms=embedding_rms(decoder),
    )
    extractor = WhisperFeatureExtractor(feature_size=sizes.n_mels)
    model = ASRModel(encoder=encoder, extractor=extractor, projector=proj, decoder=decoder, prompt=prompt)
    return model.to(device).train()


# -- clips and batches ---------------------------------------------------------------------------------------------
@dataclass
class Clip:
    seconds: float
    text: str
    wave: np.ndarray | None = None


def sample_seconds(count: int, *, rng: np.random.Generator) -> np.ndarray:
    """Clip durations: gamma(shape 2.5, scale 4 s) redrawn outside 2-30 s, which gives a mean of ~10 s."""
    out = np.empty(0)
    while out.size < count:
        draw = rng.gamma(2.5, 4.0, size=2 * count)
        out = np.concatenate([out, draw[(draw >= 2.0) & (draw <= MAX_SECONDS)]])
    return out[:count]


def sample_clips(count: int, *, tokenizer: PreTrainedTokenizerBase, rng: np.random.Generator) -> list[Clip]:
    """Clips of realistic length with transcripts of ~2.5 words per second and ~1.3 tokens per word.

    Words come from the tiny corpus's grammar: 70% of one token and 30% of two in the benchmark's tokenizer, so
    a transcript has as many tokens as Qwen3's tokenizer gives ordinary English (about 1.3 per word).
    """
    words = (*grammar.NOUNS, *grammar.ADJECTIVES, *grammar.NAMES, *grammar.PLACES, *grammar.PAST_VERBS)
    size = {w: len(tokenizer(" " + w, add_special_tokens=False).input_ids) for w in words}
    pools = [[w for w in words if size[w] == n] for n in (1, 2)]
    clips = []
    for seconds in sample_seconds(count, rng=rng):
        n = max(1, int(rng.poisson(2.5 * seconds)))
        text = [rng.choice(pools[int(rng.random() < 0.3)]) for _ in range(n)]
        clips.append(Clip(float(seconds), " ".join(text)))
    return clips


def bucketed(clips: list[Clip], *, batch_size: int, bucket_batches: int, rng: np.random.Generator) -> list[list[Clip]]:
    """The training pipeline's bucketing (`data.batching.bucket`): windows sorted by duration, batch order shuffled."""
    window = batch_size * bucket_batches
    out = []
    for start in range(0, len(clips) - window + 1, window):
        part = clips[start : start + window]
        out += [[part[j] for j in g] for g in bucket([c.seconds for c in part], batch_size=batch_size, rng=rng)]
    return out


def with_audio(batches: list[list[Clip]], *, rng: np.random.Generator) -> list[list[Clip]]:
    """Give each clip a noise waveform of its length (made before timing: decoding is `bench.data`'s subject)."""
    return [
        [
            Clip(c.seconds, c.text, (0.1 * rng.standard_normal(int(c.seconds * SAMPLE_RATE))).astype(np.float32))
            for c in b
        ]
        for b in batches
    ]


def collate_clips(clips: list[Clip], *, pad_to: int | None = None) -> Batch:
    batch = collate([c.wave for c in clips], texts=[c.text for c in clips], keys=[str(i) for i in range(len(clips))])
    if pad_to is not None:
        batch.audio = F.pad(batch.audio, (0, pad_to - batch.audio.shape[1]))
        batch.audio_lengths = torch.full_like(batch.audio_lengths, pad_to)  # the model sees 30 s of every clip
    return batch


# -- timing --------------------------------------------------------------------------------------------------------
class Timer:
    """Wall time per phase; on a GPU each boundary waits for queued kernels, so a phase owns its own work."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}
        self._last = 0.0

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # sync point: GPU time goes to the phase that queued the work
        return time.perf_counter()

    def start(self) -> None:
        self._last = self.now()

    def lap(self, phase: str) -> None:
        now = self.now()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self._last
        self._last = now


class PeakMemory:
    """Peak memory while a block runs: the CUDA allocator's peak, or on CPU the resident set sampled every 5 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the process's lifetime peak is the best there is
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @contextmanager
    def watch(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        stop = threading.Event()
        self.peak = self.rss()

        def sample() -> None:
            while not stop.wait(0.005):
                self.peak = max(self.peak, self.rss())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.peak = max(self.peak, self.rss())


@contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as the trainer's bf16 mixed precision
            yield
    else:
        yield


# -- the steps -----------------------------------------------------------------------------------------------------
def update(model: ASRModel, optimizer: torch.optim.Optimizer) -> None:
    torch.nn.utils.clip_grad_norm_(model.projector.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def full_step(model: ASRModel, optimizer: torch.optim.Optimizer, clips: list[Clip], device: torch.device) -> None:
    """What the trainer runs, uninstrumented: collate, forward (`ASRModel.forward`), backward, clip, update."""
    batch = collate_clips(clips)
    with autocast(device):
        out = model(batch.audio.to(device), batch.audio_lengths.to(device), batch.texts)
    (out.loss_sum / out.num_tokens + out.aux_loss).backward()
    update(model, optimizer)


def staged_step(
    model: ASRModel, optimizer: torch.optim.Optimizer, clips: list[Clip], timer: Timer, *, naive: bool
) -> None:
    """One step, timed stage by stage. fast: `ASRModel.forward`'s own stages; naive: pad to 30 s, every logit."""
    device = timer.device
    timer.start()
    batch = collate_clips(clips, pad_to=int(MAX_SECONDS * SAMPLE_RATE) if naive else None)
    audio, lengths = batch.audio.to(device), batch.audio_lengths.to(device)
    timer.lap("data")
    features, frame_lengths = model.features(audio, lengths)
    timer.lap("features")
    hidden, enc_lengths = model.encode_features(features, frame_lengths)
    timer.lap("encoder")
    with autocast(device):
        embeddings, num_audio, aux = model.project(hidden, enc_lengths)
        timer.lap("projector")
        inputs = model.decoder_inputs(embeddings, num_audio, batch.texts)
        if naive:
            logits = model.decoder(
                inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, use_cache=False
            ).logits  # [B, L, V]: every position, prompt and audio included
            flat = logits[:, :-1].flatten(0, 1).float()
            loss = F.cross_entropy(flat, inputs.labels[:, 1:].flatten(), ignore_index=IGNORE)
        else:
            loss_sum, tokens = model.decoder_loss(inputs)
            loss = loss_sum / tokens
        timer.lap("decoder_fwd")
    (loss + aux).backward()
    timer.lap("decoder_bwd")  # includes the projector's (small) backward
    update(model, optimizer)
    timer.lap("optimizer")


def irreducible_step(model: ASRModel, clips: list[Clip], timer: Timer) -> None:
    """Encoder forward + decoder forward/backward on the step's batch, alone: the work no implementation avoids.

    The decoder part is the bare Qwen3 body on the spliced embeddings, backward to those embeddings only, with
    the head at label positions through the same chunked loss; prompts, splicing and the projector are set up
    beforehand, untimed.
    """
    device = timer.device
    batch = collate_clips(clips)
    features, frame_lengths = model.features(batch.audio.to(device), batch.audio_lengths.to(device))
    with torch.no_grad(), autocast(device):
        embeddings, num_audio, _ = model.project(*model.encode_features(features, frame_lengths))
        inputs = model.decoder_inputs(embeddings, num_audio, batch.texts)
    embeds = inputs.inputs_embeds.detach().to(model.decoder.dtype).requires_grad_(True)
    keep = inputs.labels[:, 1:] != IGNORE
    targets = inputs.labels[:, 1:][keep]
    head = model.decoder.lm_head
    timer.start()
    with torch.inference_mode():
        model.encoder(features.to(model.encoder_dtype), frame_lengths)
    timer.lap("encoder")
    hidden = model.decoder.model(inputs_embeds=embeds, attention_mask=inputs.attention_mask, use_cache=False)
    hidden = hidden.last_hidden_state[:, :-1][keep]
    LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, LOSS_CHUNK).backward()
    timer.lap("decoder")


def measure(
    model: ASRModel, fast_batches: list[list[Clip]], naive_batches: list[list[Clip]], *, device: torch.device
) -> dict[str, dict[str, float]]:
    """Both paths on the same clips; batch 0 warms up (and gives peak memory), the others are timed.

    The timed steps interleave fast, uninstrumented, irreducible and naive calls batch by batch, so load from
    other processes on a shared machine falls on all of them alike.
    """
    optimizer = torch.optim.AdamW(model.projector.parameters(), lr=1e-4, fused=device.type == "cuda")
    fast, naive, full, parts = (Timer(device) for _ in range(4))
    fast_memory, naive_memory = PeakMemory(device), PeakMemory(device)
    # Warm-up (allocator, kernels, lazy init). Peak memory is taken here, fast first: on CPU a process keeps
    # freed heap, so a fast step measured after a naive one would inherit the naive step's footprint.
    with fast_memory.watch():
        staged_step(model, optimizer, fast_batches[0], Timer(device), naive=False)
    full_step(model, optimizer, fast_batches[0], device)
    irreducible_step(model, fast_batches[0], Timer(device))
    with naive_memory.watch():
        staged_step(model, optimizer, naive_batches[0], Timer(device), naive=True)
    ratios = []
    for i, (fast_clips, naive_clips) in enumerate(zip(fast_batches[1:], naive_batches[1:], strict=True), start=1):
        print(f"timed step {i}/{len(fast_batches) - 1}", flush=True)
        staged_step(model, optimizer, fast_clips, fast, naive=False)
        before = (full.totals.get("step", 0.0), parts.totals.get("encoder", 0.0) + parts.totals.get("decoder", 0.0))
        full.start()
        full_step(model, optimizer, fast_clips, device)
        full.lap("step")
        irreducible_step(model, fast_clips, parts)
        after = (full.totals["step"], parts.totals["encoder"] + parts.totals["decoder"])
        ratios.append((after[0] - before[0]) / (after[1] - before[1]))
        staged_step(model, optimizer, naive_clips, naive, naive=True)

    def figures(timer: Timer, batches: list[list[Clip]], memory: PeakMemory, *, padded_to_30s: bool) -> dict:
        steps = len(batches)
        samples = sum(len(b) for b in batches)
        audio_s = sum(c.seconds for b in batches for c in b)
        padded_s = samples * MAX_SECONDS if padded_to_30s else sum(len(b) * max(c.seconds for c in b) for b in batches)
        step_s = sum(timer.totals[p] for p in PHASES) / steps
        return {
            "steps": steps,
            "samples": samples,
            "mean_clip_s": audio_s / samples,
            "label_tokens_per_audio_s": sum(model.prompt.count_label_tokens(c.text) for b in batches for c in b)
            / audio_s,
            "step_s": step_s,
            "samples_per_s": samples / (step_s * steps),
            "audio_hours_per_hour": audio_s / (step_s * steps),
            **{f"{p}_s": timer.totals[p] / steps for p in PHASES},
            "padding_fraction": 1 - audio_s / padded_s,
            "peak_memory_mb": memory.peak / 2**20,
        }

    timed = len(fast_batches) - 1
    out_fast = figures(fast, fast_batches[1:], fast_memory, padded_to_30s=False)
    out_naive = figures(naive, naive_batches[1:], naive_memory, padded_to_30s=True)
    irreducible = (parts.totals["encoder"] + parts.totals["decoder"]) / timed
    out_fast |= {
        "full_step_s": full.totals["step"] / timed,
        "irreducible_encoder_s": parts.totals["encoder"] / timed,
        "irreducible_decoder_s": parts.totals["decoder"] / timed,
        "full_over_irreducible": full.totals["step"] / timed / irreducible,
        "full_over_irreducible_median": float(np.median(ratios)),  # per batch: robust to bursts of load
    }
    return {"fast": out_fast, "naive": out_naive}


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


# -- the projectors alone at real widths ----------------------------------------------------------------------------
# The course's pairings: GLM-ASR-Nano's frames into Qwen3-0.6B for mlp, into Qwen3-1.7B for mosa and moe.
PROJECTOR_WIDTHS = {
    "mlp": (REAL_06B.enc_dim, REAL_06B.dec_dim),
    "mosa": (REAL_17B.enc_dim, REAL_17B.dec_dim),
    "moe": (REAL_17B.enc_dim, REAL_17B.dec_dim),
}


def projector_step(
    projector: torch.nn.Module, features: torch.Tensor, mask: torch.Tensor, device: torch.device
) -> None:
    """Forward, a loss on the real tokens plus the projector's aux loss, backward."""
    with autocast(device):
        out, aux = projector(features, mask)  # [B, T', D]
        loss = out[mask].float().square().mean() + aux
    loss.backward()
    projector.zero_grad(set_to_none=True)


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so the next projector's resident set starts from what is used."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def bench_projectors(
    seconds: list[float], *, widths: dict[str, tuple[int, int]], device: torch.device, steps: int, seed: int
) -> dict[str, dict[str, float]]:
    """Each projector at the course's size (`ProjectorConfig`'s defaults) between the given widths, trained alone on
    one batch of random encoder frames shaped like clips of `seconds` (padded to the longest, real tokens masked).

    Peak memory is what building and training the projector adds: weights, gradients and one step's activations
    (no optimizer state), above what the process held before (CUDA allocator, or the resident set on CPU).
    """
    frames = [math.ceil(s * 100 / 2) for s in seconds]  # log-mel at 100 Hz, encoder stride 2: 50 Hz
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as the frozen encoder's output
    out = {}
    for kind, (in_dim, out_dim) in widths.items():
        cfg = ProjectorConfig(type=kind)
        torch.manual_seed(seed)
        features = torch.randn(len(frames), max(frames), in_dim, device=device, dtype=dtype)  # [B, T, C]
        tokens = torch.tensor(frames, device=device) // cfg.stack  # [B]
        mask = torch.arange(max(frames) // cfg.stack, device=device)[None, :] < tokens[:, None]  # [B, T']
        gc.collect()
        trim_heap()
        memory = PeakMemory(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else memory.rss()
        timer = Timer(device)
        with memory.watch():
            projector = build_projector(cfg, in_dim=in_dim, out_dim=out_dim, target_rms=0.03).to(device).train()
            projector_step(projector, features, mask, device)  # warm-up
            timer.start()
            for _ in range(steps):
                projector_step(projector, features, mask, device)
            timer.lap("step")
        out[kind] = {
            "in_dim": in_dim,
            "out_dim": out_dim,
            "parameters": sum(p.numel() for p in projector.parameters()),
            "tokens": int(tokens.sum()),
            "step_ms": 1000 * timer.totals["step"] / steps,
            "peak_memory_mb": (memory.peak - before) / 2**20,
        }
        del projector, features
    return out


def print_projector_table(result: dict[str, dict[str, float]], *, clips: int, device: torch.device) -> None:
    dtype = "bf16 autocast" if device.type == "cuda" else "fp32"
    tokens = next(iter(result.values()))["tokens"]
    print(f"\nprojectors alone (forward + backward, {clips} clips, {tokens} audio tokens, {dtype} on {device}):")
    print(f"{'':<6}{'widths':>14}{'parameters':>14}{'ms/step':>10}{'peak MiB':>10}")
    for kind, row in result.items():
        widths = f"{row['in_dim']} -> {row['out_dim']}"
        print(f"{kind:<6}{widths:>14}{row['parameters']:>14,}{row['step_ms']:>10.1f}{row['peak_memory_mb']:>10.0f}")


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


def print_table(result: dict) -> None:
    fast, naive = result["fast"], result["naive"]
    rows = [
        ("samples/s", "samples_per_s", "{:.2f}"),
        ("audio-hours/hour", "audio_hours_per_hour", "{:.1f}"),
        ("step (s)", "step_s", "{:.3f}"),
        *[(f"  {p} (s)", f"{p}_s", "{:.3f}") for p in PHASES],
        ("padding fraction", "padding_fraction", "{:.1%}"),
        ("peak memory (MiB)", "peak_memory_mb", "{:.0f}"),
        ("model GFLOP/sample", "gflops_per_sample", "{:.1f}"),
        ("achieved GFLOP/s", "achieved_gflops_per_s", "{:.1f}"),
    ]
    print(f"\n{'':<22}{'fast':>12}{'naive':>12}")
    for label, key, fmt in rows:
        print(f"{label:<22}{fmt.format(fast[key]):>12}{fmt.format(naive[key]):>12}")
    print(f"{'speed-up (samples/s)':<22}{result['speedup']:>12.2f}x")
    print(
        f"\nfull step {fast['full_step_s']:.3f} s uninstrumented / irreducible "
        f"{fast['irreducible_encoder_s']:.3f} s encoder + {fast['irreducible_decoder_s']:.3f} s decoder fwd+bwd "
        f"= {fast['full_over_irreducible']:.3f} (median over batches {fast['full_over_irreducible_median']:.3f})"
    )
    proj = result["projection"]
    util = result["config"]["utilisation"]
    steps, batch = result["config"]["projected_steps"], result["config"]["projected_batch_size"]
    print(f"\nreal sizes (GLM-ASR-Nano encoder + Qwen3), {steps:,} steps x {batch} clips at {util:.0%} of bf16 peak:")
    print(f"{'':<20}{'GFLOP/sample':>14}{'encoder':>10}{'decoder':>10}{'A40 h':>9}{'H100 h':>9}")
    for name, row in proj.items():
        dec = row["decoder_fwd_gflops_per_sample"] + row["decoder_bwd_gflops_per_sample"]
        print(
            f"{name:<20}{row['total_gflops_per_sample']:>14.0f}{row['encoder_gflops_per_sample']:>10.0f}"
            f"{dec:>10.0f}{row['A40_hours']:>9.2f}{row['H100 SXM_hours']:>9.2f}"
        )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BENCH_DEFAULT
    p.add_argument("--projector", choices=("mlp", "mosa", "moe"), default="mlp")
    p.add_argument("--batch-size", type=int, default=4, help="clips per step (the experiments use 8: --batch-size 8)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per path, after one warm-up step")
    p.add_argument("--bucket-batches", type=int, default=32, help="batches sorted together (data.bucket_batches)")
    p.add_argument("--enc-dim", type=int, default=d.enc_dim)
    p.add_argument("--enc-layers", type=int, default=d.enc_layers)
    p.add_argument("--enc-heads", type=int, default=d.enc_heads)
    p.add_argument("--dec-dim", type=int, default=d.dec_dim)
    p.add_argument("--dec-layers", type=int, default=d.dec_layers)
    p.add_argument("--dec-heads", type=int, default=d.dec_heads)
    p.add_argument("--vocab", type=int, default=d.vocab, help="decoder vocabulary (Qwen3's by default)")
    p.add_argument("--proj-hidden", type=int, default=d.proj_hidden)
    p.add_argument("--utilisation", type=float, default=0.4, help="fraction of GPU bf16 peak for projections")
    p.add_argument("--project-steps", type=int, default=20_000)
    p.add_argument("--project-batch-size", type=int, default=8, help="clips per step for the projection (mlp: 8)")
    p.add_argument("--compile", action="store_true", help="torch.compile projector and decoder (dynamic shapes)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--projector-widths",
        choices=("real", "bench", "none"),
        default="real",
        help="the projectors-alone section: real (mlp 1280->1024, mosa and moe 1280->2048), bench (this benchmark's "
        "encoder and decoder widths: quick), none (skip it)",
    )
    p.add_argument("--projector-steps", type=int, default=2, help="timed steps per projector, after one warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", help="also write the JSON here")
    args = p.parse_args(argv)

    sizes = Sizes(
        enc_dim=args.enc_dim,
        enc_layers=args.enc_layers,
        enc_heads=args.enc_heads,
        enc_ffn=4 * args.enc_dim,
        dec_dim=args.dec_dim,
        dec_layers=args.dec_layers,
        dec_heads=args.dec_heads,
        dec_kv_heads=max(1, args.dec_heads // 2),
        dec_head_dim=args.dec_dim // args.dec_heads,
        dec_ffn=3 * args.dec_dim,
        vocab=args.vocab,
        proj_hidden=args.proj_hidden,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = build_model(
        sizes, projector=args.projector, device=device, dtype=torch.bfloat16 if cuda else torch.float32, seed=args.seed
    )
    if args.compile:
        model.compile_parts(dynamic=True)  # the warm-up step then includes compilation; timed steps do not
    rng = np.random.default_rng(args.seed)
    window = args.batch_size * args.bucket_batches
    count = window * math.ceil((args.steps + 1) / args.bucket_batches)
    pool = sample_clips(count, tokenizer=model.prompt.tokenizer, rng=rng)
    fast_batches = bucketed(pool, batch_size=args.batch_size, bucket_batches=args.bucket_batches, rng=rng)
    fast_batches = with_audio(fast_batches[: args.steps + 1], rng=rng)
    # The naive path trains on the very same clips, in arrival order instead of bucketed.
    same = [c for b in fast_batches[1:] for c in b]
    same = [same[i] for i in rng.permutation(len(same))]
    naive_batches = [fast_batches[0]] + [same[i : i + args.batch_size] for i in range(0, len(same), args.batch_size)]
    trainable = sum(q.numel() for q in model.projector.parameters())
    frozen = sum(q.numel() for q in model.parameters()) - trainable
    print(
        f"device {device} ({torch.get_num_threads()} threads) | {args.projector} projector: {trainable:,} trainable, "
        f"{frozen:,} frozen | sizes {asdict(sizes)}"
    )

    result = measure(model, fast_batches, naive_batches, device=device)
    for name, batches in (("fast", fast_batches), ("naive", naive_batches)):
        r = result[name]
        r["gflops_per_sample"] = bench_flops(model, sizes, batches, naive=name == "naive") / 1e9
        r["achieved_gflops_per_s"] = r["gflops_per_sample"] * r["samples_per_s"]
    result["speedup"] = result["fast"]["samples_per_s"] / result["naive"]["samples_per_s"]
    result["projection"] = real_projection(
        steps=args.project_steps, batch_size=args.project_batch_size, utilisation=args.utilisation, seed=args.seed
    )
    result["config"] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "projector": args.projector,
        "compile": args.compile,
        "batch_size": args.batch_size,
        "bucket_batches": args.bucket_batches,
        "sizes": asdict(sizes),
        "utilisation": args.utilisation,
        "projected_steps": args.project_steps,
        "projected_batch_size": args.project_batch_size,
        "projector_widths": args.projector_widths,
        "projector_steps": args.projector_steps,
    }
    print_table(result)
    if args.projector_widths != "none":
        widths = PROJECTOR_WIDTHS
        if args.projector_widths == "bench":
            widths = {kind: (sizes.enc_dim, sizes.dec_dim) for kind in PROJECTOR_WIDTHS}
        # the bucketed batch of median total length: a batch as the trainer forms them, of typical size
        clips = sorted(fast_batches, key=lambda b: sum(c.seconds for c in b))[len(fast_batches) // 2]
        del model  # the section measures the projectors' own memory
        result["projectors"] = bench_projectors(
            [c.seconds for c in clips], widths=widths, device=device, steps=args.projector_steps, seed=args.seed
        )
        print_projector_table(result["projectors"], clips=len(clips), device=device)
    text = json.dumps(result, sort_keys=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
