"""The second stage: LoRA adapters on the frozen decoder, trained with the projector, saved, resumed, exported and
loaded, and a fresh run started from a first stage's projector (training.init_from)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from test_train import run_entrypoint, tiny_config

from tiny_audio.checkpoint import RESUME_DIR
from tiny_audio.data import build_train_stream
from tiny_audio.distributed import make_accelerator
from tiny_audio.export import load_trained
from tiny_audio.model.loading import build_model, parameter_report
from tiny_audio.model.lora import ADAPTER_CONFIG_FILE, ADAPTERS_FILE, adapter_parameters
from tiny_audio.precision import Precision
from tiny_audio.step import forward_backward
from tiny_audio.train import cleanup, setup, train_loop

LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8"]


def expected_adapter_parameters(decoder: torch.nn.Module, rank: int, targets: list[str]) -> int:
    """r x (in + out) for every targeted linear layer of the decoder."""
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in decoder.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets and "lora_" not in name
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16-frozen"])
def test_adapters_train_with_the_projector_and_nothing_else_does(precision: str) -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = tiny_config(*LORA, f"training.precision={precision}")
    acc = make_accelerator(cfg)
    frozen = Precision.resolve(precision, device_type="cpu").frozen_dtype
    model = build_model(cfg, device=acc.device, frozen_dtype=frozen)
    report = {part: (trainable, frozen_count) for part, trainable, frozen_count in parameter_report(model)}
    base = build_model(tiny_config(), device=acc.device)
    assert report["decoder"][0] == expected_adapter_parameters(base.decoder, 4, cfg.lora.target_modules) > 0
    assert report["encoder"][0] == 0 and report["projector"][0] > 0
    assert all(p.dtype == torch.float32 for p in adapter_parameters(model.decoder))  # trained weights in fp32
    model.train()
    assert model.decoder.training and not model.encoder.training  # the adapters' dropout is on
    stream = build_train_stream(data=cfg.data, batch_size=4, seed=0, count_tokens=model.prompt.count_label_tokens)
    try:
        forward_backward(model, model, acc, [next(stream)])
    finally:
        stream.close()
    for name, param in model.named_parameters():
        trains = name.startswith("projector.") or "lora_" in name
        assert (param.grad is not None) == trains, name
    lora_b = [p for n, p in model.decoder.named_parameters() if "lora_B" in n]
    lora_a = [p for n, p in model.decoder.named_parameters() if "lora_A" in n]
    assert all(p.grad.abs().sum() > 0 for p in lora_b)  # B starts at zero, so A's gradient is zero at first
    assert all(p.grad is not None for p in lora_a)
    model.eval()
    assert not model.decoder.training
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_trained_stage_exports_its_adapters_and_loads_back(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_entrypoint(out, *LORA, "training.max_steps=3", "training.save_steps=3", "training.learning_rate=0.05")
    assert result.returncode == 0, result.stderr[-3000:]
    final = out / "checkpoints" / "step-00000003"
    assert (final / ADAPTERS_FILE).is_file() and (final / RESUME_DIR / ADAPTERS_FILE).is_file()
    peft_config = json.loads((final / ADAPTER_CONFIG_FILE).read_text())
    assert peft_config["r"] == 4 and "q_proj" in peft_config["target_modules"]
    assert "LoRA adapters" in (final / "README.md").read_text()  # the model card names the stage
    model, cfg = load_trained(final, device=torch.device("cpu"))
    saved = load_file(str(final / ADAPTERS_FILE))
    from peft import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(model.decoder)
    assert saved.keys() == loaded.keys() and cfg.lora.enabled
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained: B moved off zero
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


def test_a_second_stage_starts_from_the_first_stage_projector(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = tmp_path / "first"
    assert run_entrypoint(first, "training.max_steps=2", "training.save_steps=2").returncode == 0
    stage_one = first / "checkpoints" / "step-00000002"
    weights = load_file(str(stage_one / "projector.safetensors"))
    fresh = build_model(tiny_config(), device=torch.device("cpu")).projector.state_dict()
    assert any(not torch.equal(fresh[k], weights[k]) for k in weights)  # stage one did train

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = tiny_config(*LORA, f"training.init_from={stage_one}", "training.max_steps=1")
    with caplog.at_level(logging.INFO, logger="tiny_audio"):
        run = setup(cfg, output_dir=tmp_path / "second", token=None, target=None)
    try:
        for name, value in run.raw.projector.state_dict().items():
            assert torch.equal(value, weights[name]), name
        # its adapters start as a no-op (B = 0): the second stage starts from the first stage's model
        assert all(p.abs().sum() == 0 for n, p in run.raw.decoder.named_parameters() if "lora_B" in n)
        assert f"started from training.init_from={stage_one}: its projector" in caplog.text
        assert train_loop(run) == 0
    finally:
        cleanup(run)
    assert (tmp_path / "second" / "checkpoints" / "step-00000001" / ADAPTERS_FILE).is_file()


def test_init_from_a_checkpoint_of_other_models_is_refused(tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert run_entrypoint(first, "training.max_steps=1", "training.save_steps=1").returncode == 0
    other = run_entrypoint(
        tmp_path / "second",
        *LORA,
        f"training.init_from={first / 'checkpoints' / 'step-00000001'}",
        "projector.hidden_dim=32",
        "training.max_steps=1",
    )
    assert other.returncode == 2
    assert "projector.hidden_dim" in other.stderr.strip().splitlines()[-1]
