"""Training-step benchmark: where a step's time goes, against the irreducible work and a naive baseline.

    python -m tools.bench.step                  # CPU-friendly defaults, real 151,936-token vocabulary
    python -m tools.bench.step --batch-size 8 --json-out step.json   # the experiments' batch (naive: ~11 GB)

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
import json
import math
import platform
from dataclasses import asdict

import numpy as np
import torch
from accelerate import Accelerator
from torch.nn import functional as F

from tiny_audio.model.asr import IGNORE, LOSS_CHUNK, ASRModel, LinearCrossEntropy
from tiny_audio.step import forward_backward
from tools.bench.flops import bench_flops, real_projection
from tools.bench.projectors import PROJECTOR_WIDTHS, bench_projectors, print_projector_table
from tools.bench.timing import PHASES, PeakMemory, Timer, autocast
from tools.bench.workload import (
    BENCH_DEFAULT,
    MAX_SECONDS,
    REAL_SIZES,
    SAMPLE_RATE,
    Clip,
    Sizes,
    bucketed,
    build_model,
    collate_clips,
    sample_clips,
    with_audio,
)


# -- the steps -----------------------------------------------------------------------------------------------------
def update(model: ASRModel, optimizer: torch.optim.Optimizer) -> None:
    torch.nn.utils.clip_grad_norm_(model.projector.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def full_step(model: ASRModel, optimizer: torch.optim.Optimizer, clips: list[Clip], acc: Accelerator) -> None:
    """What the trainer runs, uninstrumented: collate, its own `forward_backward` (tiny_audio.step), clip, update."""
    forward_backward(model, model, acc, [collate_clips(clips)])
    update(model, optimizer)


def bench_accelerator(device: torch.device) -> Accelerator:
    """The trainer's accelerator for one process: bf16 autocast on CUDA, none on CPU (training.precision=auto)."""
    return Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no")


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
    acc = bench_accelerator(device)
    fast, naive, full, parts = (Timer(device) for _ in range(4))
    fast_memory, naive_memory = PeakMemory(device), PeakMemory(device)
    # Warm-up (allocator, kernels, lazy init). Peak memory is taken here, fast first: on CPU a process keeps
    # freed heap, so a fast step measured after a naive one would inherit the naive step's footprint.
    with fast_memory.watch():
        staged_step(model, optimizer, fast_batches[0], Timer(device), naive=False)
    full_step(model, optimizer, fast_batches[0], acc)
    irreducible_step(model, fast_batches[0], Timer(device))
    with naive_memory.watch():
        staged_step(model, optimizer, naive_batches[0], Timer(device), naive=True)
    ratios = []
    for i, (fast_clips, naive_clips) in enumerate(zip(fast_batches[1:], naive_batches[1:], strict=True), start=1):
        print(f"timed step {i}/{len(fast_batches) - 1}", flush=True)
        staged_step(model, optimizer, fast_clips, fast, naive=False)
        before = (full.totals.get("step", 0.0), parts.totals.get("encoder", 0.0) + parts.totals.get("decoder", 0.0))
        full.start()
        full_step(model, optimizer, fast_clips, acc)
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


def compare_compile(
    sizes: Sizes, batches: list[list[Clip]], *, projectors: list[str], device: torch.device, seed: int
) -> dict[str, dict[str, float]]:
    """The trainer's step eager and torch.compiled (`training.compile`: projector and decoder body, dynamic
    shapes), side by side per projector, on the same bucketed batches: batch 0 warms up (for the compiled model
    it includes the compilation, reported apart), the others are timed."""
    from tiny_audio.compile import compiled_graphs

    out: dict[str, dict[str, float]] = {}
    for kind in projectors:
        model = build_model(sizes, projector=kind, device=device, dtype=_frozen_dtype(device), seed=seed)
        optimizer = torch.optim.AdamW(model.projector.parameters(), lr=1e-4, fused=device.type == "cuda")
        acc = bench_accelerator(device)
        row: dict[str, float] = {}
        for compiled in (False, True):
            timer = Timer(device)
            if compiled:
                torch._dynamo.reset()
                model.compile_parts(dynamic=True)
                graphs = compiled_graphs()
            timer.start()
            full_step(model, optimizer, batches[0], acc)
            timer.lap("first")
            for clips in batches[1:]:
                full_step(model, optimizer, clips, acc)
            timer.lap("steps")
            key = "compiled" if compiled else "eager"
            row[f"{key}_step_s"] = timer.totals["steps"] / max(len(batches) - 1, 1)
            row[f"{key}_first_step_s"] = timer.totals["first"]
        row["speedup"] = row["eager_step_s"] / row["compiled_step_s"]
        row["graphs"] = compiled_graphs() - graphs
        out[kind] = row
        del model, optimizer
    return out


def _frozen_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def print_compile_table(result: dict[str, dict[str, float]], *, device: torch.device, steps: int) -> None:
    print(f"\ntorch.compile, the trainer's step on {device} ({steps} timed steps after the first):")
    print(
        f"{'':6} {'eager step':>11} {'compiled step':>14} {'speed-up':>9} {'first step (compiling)':>23} {'graphs':>7}"
    )
    for kind, r in result.items():
        print(
            f"{kind:6} {r['eager_step_s']:>10.3f}s {r['compiled_step_s']:>13.3f}s {r['speedup']:>8.2f}x "
            f"{r['compiled_first_step_s']:>22.1f}s {int(r['graphs']):>7}"
        )


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
    p.add_argument(
        "--real",
        choices=("0.6b", "1.7b"),
        help="the real models' exact sizes (GLM-ASR-Nano's tower and Qwen3-0.6B or 1.7B, all layers: a GPU's job); "
        "the size flags below are then ignored",
    )
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
    p.add_argument(
        "--project-batch-size", type=int, default=32, help="clips per step for the projection (the course: 32)"
    )
    p.add_argument(
        "--compile-projectors",
        default="mlp,mosa,moe",
        help="the step eager and torch.compiled, side by side, for these projectors (comma-separated; none: skip)",
    )
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

    sizes = (
        REAL_SIZES[args.real]
        if args.real
        else Sizes(
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
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = build_model(
        sizes, projector=args.projector, device=device, dtype=torch.bfloat16 if cuda else torch.float32, seed=args.seed
    )
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
        "compile_projectors": args.compile_projectors,
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
    if args.compile_projectors != "none":
        kinds = [k.strip() for k in args.compile_projectors.split(",") if k.strip()]
        result["compile"] = compare_compile(sizes, fast_batches, projectors=kinds, device=device, seed=args.seed)
        print_compile_table(result["compile"], device=device, steps=len(fast_batches) - 1)
    text = json.dumps(result, sort_keys=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
