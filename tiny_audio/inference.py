"""Using a trained checkpoint: `eval` (WER on a data source, per-sample results) and `transcribe` (files -> text).

A checkpoint is the loadable model at the root of a checkpoint folder or Hub repo (`projector.safetensors`,
`tiny_audio_config.json` naming the base models, tokenizer, preprocessor settings); `export.load_trained`
rebuilds the full model from it. A Hub repo is fetched without its `last-checkpoint/` resume files.
Decoding uses `ASRModel.generate`, i.e. exactly the prompt training used.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from tiny_audio.checkpoint import MODEL_CONFIG_FILE, RESUME_DIR
from tiny_audio.config import Config, DataConfig
from tiny_audio.errors import ConfigError, UserError
from tiny_audio.evaluate import word_error_rate
from tiny_audio.experiments import load_config, parse_override
from tiny_audio.export import load_trained
from tiny_audio.model.asr import ASRModel
from tiny_audio.precision import Precision
from tiny_audio.text import normalize_for_wer

log = logging.getLogger("tiny_audio")

MAX_CLIP_SECONDS = 30.0
"""The encoder's window: longer files are transcribed in consecutive windows of this length."""
PROGRESS_EVERY_S = 5.0


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def checkpoint_folder(model_ref: str, *, token: str | None, endpoint: str | None = None) -> Iterator[Path]:
    """A local folder holding the checkpoint `model_ref` names (a local folder, or a Hub repo downloaded to a
    temporary folder for the duration of the block)."""
    local = Path(model_ref).expanduser()
    if local.is_dir():
        yield local
        return
    from tiny_audio.hub import HubRepo, is_hub_repo, repo_id_of

    if local.exists() or not is_hub_repo(model_ref):
        raise UserError(f"--model {model_ref}: not a checkpoint folder nor a Hub repo id (user/name)")
    from huggingface_hub.errors import RepositoryNotFoundError

    repo = HubRepo(repo_id_of(model_ref), token=token, endpoint=endpoint)
    with tempfile.TemporaryDirectory(prefix="tiny-audio-model-") as tmp:
        try:
            folder = repo.download(local_dir=Path(tmp) / "model", ignore_patterns=[f"{RESUME_DIR}/*"])
        except RepositoryNotFoundError:
            who = "with this HF_TOKEN" if token else "without HF_TOKEN"
            raise UserError(f"--model {model_ref}: no such Hub repo, or it is private ({who})") from None
        yield folder


def load_checkpoint(
    model_ref: str, *, token: str | None, device: torch.device | None = None, endpoint: str | None = None
) -> tuple[ASRModel, Config]:
    """The trained model (eval mode) and the config it was trained with."""
    with checkpoint_folder(model_ref, token=token, endpoint=endpoint) as folder:
        if not (folder / MODEL_CONFIG_FILE).is_file() and (folder / RESUME_DIR).is_dir():
            raise UserError(f"{folder} holds only resume files: point --model at a step-N checkpoint folder")
        return load_trained(folder, device=device or default_device(), token=token)


def eval_data_config(
    checkpoint_cfg: Config, *, experiment: str | None, overrides: Sequence[str], samples: int | None
) -> DataConfig:
    """The data section eval reads: the experiment's (with overrides) if one is named, else the checkpoint's."""
    if experiment:
        data = load_config(experiment, tuple(overrides)).data
    else:
        raw = checkpoint_cfg.to_dict()
        for text in overrides:
            keys, value = parse_override(text)
            node = raw
            for key in keys[:-1]:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override '{text}': {key} is not a section")
            node[keys[-1]] = value
        try:
            data = Config.model_validate(raw).data
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"override: {where}: {first['msg']}") from None
    if data.eval is None:
        raise UserError("no data.eval source to evaluate on: name an experiment with one or override data.eval.*")
    if samples is not None:
        if samples < 1:
            raise UserError(f"--samples must be at least 1 (got {samples})")
        data.eval_samples = samples
    return data


def _source_label(data: DataConfig) -> str:
    source = data.eval
    assert source is not None
    parts = [source.path, source.name or "", source.split]
    if source.data_files:
        parts.append(",".join(source.data_files))
    return " ".join(p for p in parts if p)


def evaluate_checkpoint(
    model_ref: str,
    *,
    experiment: str | None,
    overrides: Sequence[str],
    samples: int | None,
    output: Path,
    token: str | None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """Greedy WER (and token loss) of a checkpoint on a seeded sample of `samples` valid held-out samples.

    Each sample becomes one JSON line in `output` (key, reference, hypothesis, their normalised forms, word
    errors); progress is logged; the returned summary is what the CLI prints.
    """
    from tiny_audio.data import build_eval_set

    if output.is_dir():
        raise UserError(f"--output {output} is a folder: give a file name such as eval_results.jsonl")
    model, cfg = load_checkpoint(model_ref, token=token, endpoint=endpoint)
    data = eval_data_config(cfg, experiment=experiment, overrides=overrides, samples=samples)
    device = next(model.projector.parameters()).device
    precision = Precision.resolve(cfg.training.precision, device_type=device.type)
    log.info("eval: %s on %s (%d samples)", model_ref, _source_label(data), data.eval_samples)
    # every sample is transcribed here: the whole sample is the "WER subset"
    data.eval_wer_samples = data.eval_samples
    batches = build_eval_set(
        data=data, batch_size=cfg.training.batch_size, count_tokens=model.prompt.count_label_tokens
    ).batches
    total = sum(len(b) for b in batches)
    if total == 0:
        raise UserError(f"the eval source {_source_label(data)} holds no valid samples")
    output.parent.mkdir(parents=True, exist_ok=True)
    refs: list[str] = []
    hyps: list[str] = []
    loss_sum, tokens = 0.0, 0
    start = last_report = time.perf_counter()
    with output.open("w") as out, torch.no_grad(), precision.context(device.type):
        for batch in batches:
            audio, lengths = batch.audio.to(device), batch.audio_lengths.to(device)
            step = model(audio, lengths, batch.texts)
            loss_sum += float(step.loss_sum)
            tokens += step.num_tokens
            texts = model.generate(audio, lengths, max_new_tokens=data.max_new_tokens)
            for key, ref, hyp in zip(batch.keys, batch.texts, texts, strict=True):
                norm_ref, norm_hyp = normalize_for_wer(ref), normalize_for_wer(hyp)
                errors = _word_errors(norm_ref, norm_hyp)
                record = {
                    "key": key,
                    "reference": ref,
                    "hypothesis": hyp,
                    "normalized_reference": norm_ref,
                    "normalized_hypothesis": norm_hyp,
                    "word_errors": errors,
                    "reference_words": len(norm_ref.split()),
                }
                out.write(json.dumps(record) + "\n")
            refs += batch.texts
            hyps += texts
            now = time.perf_counter()
            if now - last_report >= PROGRESS_EVERY_S or len(refs) == total:
                last_report = now
                log.info(
                    "eval: %d/%d samples | WER so far %.1f%% | %.0fs",
                    len(refs),
                    total,
                    100 * word_error_rate(refs, hyps),
                    now - start,
                )
    wer = word_error_rate(refs, hyps)
    return {
        "model": model_ref,
        "data": _source_label(data),
        "samples": len(refs),
        "wer": None if math.isnan(wer) else round(wer, 4),
        "loss": round(loss_sum / max(tokens, 1), 4),
        "results": str(output),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _word_errors(reference: str, hypothesis: str) -> int:
    """Substitutions + deletions + insertions between two normalised transcripts."""
    import jiwer

    if not reference:
        return len(hypothesis.split())
    if not hypothesis:
        return len(reference.split())
    result = jiwer.process_words(reference, hypothesis)
    return result.substitutions + result.deletions + result.insertions


def read_audio(path: Path) -> torch.Tensor:
    """An audio file -> mono float32 samples at 16 kHz [S]; a missing or unreadable file is a UserError."""
    from tiny_audio.data.audio import AudioError, decode

    if not path.is_file():
        raise UserError(f"{path}: no such audio file")
    try:
        decoded = decode(path.read_bytes())
    except AudioError as exc:
        raise UserError(f"{path}: not readable as audio ({exc})") from None
    if decoded.wave.size == 0:
        raise UserError(f"{path}: holds no audio samples")
    return torch.from_numpy(decoded.wave)


def transcribe_files(
    model_ref: str, paths: Sequence[Path], *, token: str | None, endpoint: str | None = None
) -> Iterable[tuple[Path, str]]:
    """(path, transcript) for each audio file, in order. Every file is read before the model is loaded, so a
    wrong path fails at once; a file longer than 30 s is transcribed window by window."""
    from tiny_audio.data.audio import SAMPLE_RATE

    waves = [(Path(p), read_audio(Path(p))) for p in paths]
    model, cfg = load_checkpoint(model_ref, token=token, endpoint=endpoint)
    device = next(model.projector.parameters()).device
    precision = Precision.resolve(cfg.training.precision, device_type=device.type)
    window = int(MAX_CLIP_SECONDS * SAMPLE_RATE)
    for path, wave in waves:
        pieces = []
        for start in range(0, wave.shape[0], window):
            chunk = wave[start : start + window]
            with precision.context(device.type):
                text = model.generate(
                    chunk[None].to(device),
                    torch.tensor([chunk.shape[0]], device=device),
                    max_new_tokens=cfg.data.max_new_tokens,
                )[0]
            if text:
                pieces.append(text)
        yield path, " ".join(pieces)
