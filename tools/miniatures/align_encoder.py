"""Shape the CTC-pretrained mini tower for a language model, as GLM-ASR's tower was shaped for its own LLM.

GLM-ASR's encoder did not only learn to recognise speech: it was trained together with an adapter into an LLM, so
its output is already laid out for a language model to read. A tower pretrained with CTC alone is not, and the
miniature run then spends most of its steps teaching the projector what GLM-ASR's encoder brings for free. So
the build trains the tower on, together with a fresh projector, into a frozen SECOND decoder: the shipped
decoder's recipe with another seed, standing for GLM-ASR's LLM. The shipped decoder (standing for Qwen3) never
sees this stage, so the projector of a `mini` run still has to learn a map between two models trained apart.
Measured: the `mini` run reaches held-out WER 5.9% at step 600 on the aligned tower, 13.6% at 1,200 on the CTC one.

The model is the trainer's own (`build_model` on the `mini` experiment, the trainer's prompt, projector and
loss), with the tower unfrozen; the loop is plain, over length-bucketed batches of precomputed log-mels.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tiny_audio.data.batching import collate
from tiny_audio.evaluate import evaluate
from tiny_audio.experiments import load_config
from tiny_audio.model.asr import ASRModel
from tiny_audio.model.loading import build_model
from tools.miniatures.pretrain_encoder import endless_batches, log_mel, pad_features

WARMUP_STEPS = 30
TOWER_PREFIX = "audio_tower."  # where the tower sits in a saved GLM-ASR checkpoint (`models.save_encoder`)


def align_encoder(
    *,
    encoder_dir: Path,
    decoder_dir: Path,
    clips: Sequence[np.ndarray],
    texts: Sequence[str],
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    log: Callable[[str], None] = print,
) -> ASRModel:
    """Train the tower saved in `encoder_dir` with a fresh `mini` projector into the frozen decoder in
    `decoder_dir`, at a constant learning rate after a short warm-up; the tower's tensors are written back in
    place (float16), the checkpoint's other tensors and files untouched.

    Returns the trained model (tower + projector + that decoder), e.g. to measure its held-out WER.
    """
    overrides = [f"model.encoder_id={encoder_dir}", f"model.decoder_id={decoder_dir}", f"training.seed={seed}"]
    model = build_model(load_config("mini", overrides), device=torch.device("cpu"))
    tower = model.encoder.tower
    tower.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]  # the tower and the projector
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP_STEPS))
    mels = log_mel(clips, model.feature_extractor)
    rng = random.Random(seed)
    model.train()
    batches = endless_batches([m.shape[-1] for m in mels], batch_size=batch_size, rng=rng)
    start = time.perf_counter()
    for step, batch in zip(range(1, steps + 1), batches, strict=False):
        features, enc_lengths = pad_features([mels[i] for i in batch])
        hidden, enc_lengths = model.encoder(features, 2 * enc_lengths)  # with gradient, unlike the trainer's
        embeddings, num_audio, _ = model.project(hidden, enc_lengths)
        loss_sum, num_tokens = model.decoder_loss(
            model.decoder_inputs(embeddings, num_audio, [texts[i] for i in batch])
        )
        loss = loss_sum / num_tokens
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step == 1 or step % 50 == 0 or step == steps:
            elapsed = time.perf_counter() - start
            log(f"align step {step}/{steps} | loss {loss.item():.3f} | grad norm {grad_norm:.2f} | {elapsed:.0f}s")
    model.eval()
    tower.requires_grad_(False)

    _write_tower(tower.state_dict(), encoder_dir / "model.safetensors")
    return model


def _write_tower(trained: dict[str, torch.Tensor], path: Path) -> None:
    """Replace the tower's tensors in a saved GLM-ASR checkpoint (float16), leaving its other files untouched."""
    weights = load_file(path)
    keys = {name: f"{TOWER_PREFIX}{name}" for name in trained}
    if missing := [key for key in keys.values() if key not in weights]:
        raise ValueError(f"{path} has no tensor {missing[0]}")
    weights |= {key: trained[name].detach().half().contiguous() for name, key in keys.items()}
    save_file(weights, path, metadata={"format": "pt"})


def held_out_wer(model: ASRModel, clips: Sequence[np.ndarray], texts: Sequence[str], *, batch_size: int = 25) -> float:
    """Greedy WER of `clips` against `texts`, through the trainer's own batching and evaluation."""
    starts = range(0, len(clips), batch_size)
    batches = [
        collate(clips[i : i + batch_size], texts=texts[i : i + batch_size], keys=texts[i : i + batch_size])
        for i in starts
    ]
    result = evaluate(model, batches, device=torch.device("cpu"), wer_samples=len(clips), max_new_tokens=48)
    return float(result.wer)
