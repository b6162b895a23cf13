"""SpecAugment: the configured number of masks of at most the configured widths, inside each clip, only while
training, and drawn from the run's seeded RNG so that a resumed run masks as the uninterrupted one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_train import read_metrics, run_entrypoint

from tiny_audio.experiments import load_config
from tiny_audio.model.augment import SpecAugment
from tiny_audio.model.loading import build_model


def runs(flags: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor."""
    lengths, current = [], 0
    for flag in [*flags.tolist(), False]:
        if flag:
            current += 1
        elif current:
            lengths.append(current)
            current = 0
    return lengths


def test_masks_have_the_configured_counts_and_widths_inside_each_clip() -> None:
    augment = SpecAugment(time_masks=2, time_mask_frames=100, freq_masks=2, freq_mask_bins=27)
    lengths = torch.tensor([300, 150, 60])
    widest_time = widest_freq = 0
    torch.manual_seed(0)
    for _ in range(200):
        features = torch.ones(3, 128, 320)
        out = augment(features, lengths)
        for i, n in enumerate(lengths.tolist()):
            zero = out[i] == 0
            time = zero.all(dim=0)  # frames masked in every bin
            unmasked = ~time[:n]
            if not unmasked.any():  # one time mask covered this short clip whole: nothing left to see bins in
                continue
            freq = zero[:, :n][:, unmasked].all(dim=1)  # bins masked over every frame left
            assert not time[n:].any()  # never in the padding (whose features stay untouched)
            # two masks each (overlapping ones merge into one run), each at most its width
            assert len(runs(time)) <= 2 and sum(runs(time)) <= 2 * min(100, n)
            assert len(runs(freq)) <= 2 and sum(runs(freq)) <= 2 * 27
            widest_time = max(widest_time, *runs(time), 0)
            widest_freq = max(widest_freq, *runs(freq), 0)
            partial = zero[:, :n] & ~time[None, :n] & ~freq[:, None]
            assert not partial.any()  # nothing masked but whole frames and whole bins
    assert widest_time >= 90 and widest_freq >= 24  # the configured widths are reached


def test_masks_apply_in_training_only(tiny_model_dirs: tuple[Path, Path]) -> None:
    encoder, decoder = tiny_model_dirs
    cfg = load_config(
        "tiny", [f"model.encoder_id={encoder}", f"model.decoder_id={decoder}", "data.spec_augment.enabled=true"]
    )
    model = build_model(cfg, device=torch.device("cpu"))
    audio, lengths = 0.1 * torch.randn(2, 16000), torch.tensor([16000, 12000])
    plain, _ = model.log_mel(audio, lengths)
    model.train()
    trained, _ = model.features(audio, lengths)
    assert (trained == 0).sum() > (plain == 0).sum()
    model.eval()
    torch.testing.assert_close(model.features(audio, lengths)[0], plain, rtol=0, atol=0)
    disabled = build_model(
        load_config("tiny", [f"model.encoder_id={encoder}", f"model.decoder_id={decoder}"]), device=torch.device("cpu")
    )
    assert disabled.spec_augment is None


@pytest.mark.slow
def test_a_resumed_run_draws_the_same_masks(tmp_path: Path) -> None:
    steps = ["training.max_steps=4", "training.save_steps=2", "data.spec_augment.enabled=true"]
    first = tmp_path / "first"
    assert run_entrypoint(first, *steps).returncode == 0
    expected = {m["step"]: m["train/loss"] for m in read_metrics(first)}

    resumed = tmp_path / "resumed"
    shutil.copytree(first / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    result = run_entrypoint(resumed, *steps)
    assert result.returncode == 0 and "at step 2" in result.stdout, result.stderr[-2000:]
    got = {m["step"]: m["train/loss"] for m in read_metrics(resumed)}
    assert sorted(got) == [3, 4]
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=1e-6), step

    plain = tmp_path / "plain"
    assert run_entrypoint(plain, "training.max_steps=4", "training.save_steps=4").returncode == 0
    unmasked = {m["step"]: m["train/loss"] for m in read_metrics(plain)}
    assert any(abs(unmasked[s] - expected[s]) > 1e-4 for s in (1, 2, 3, 4))  # the masks changed the losses
