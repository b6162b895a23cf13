"""The projectors alone, side by side: forward + backward of mlp (1280 -> 1024), mosa and moe (1280 -> 2048) at the
course's real sizes (12.6M, 118.1M and 183.6M parameters) on a bucketed batch of realistic lengths, with their
parameters and peak memory."""

from __future__ import annotations

import gc
import math

import torch

from tiny_audio.config import ProjectorConfig
from tiny_audio.model.projectors import build_projector
from tools.bench.timing import PeakMemory, Timer, autocast, trim_heap
from tools.bench.workload import REAL_06B, REAL_17B

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
