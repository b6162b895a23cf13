"""Every `training.precision` trains a step on CPU (bf16 autocast exists there too): frozen parts in the dtype the
setting names, the projector's weights and gradients in fp32, its maths under autocast only where asked."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate.state import AcceleratorState
from test_train import tiny_config

from tiny_audio.data import build_train_stream
from tiny_audio.distributed import deepspeed_config, make_accelerator
from tiny_audio.model.loading import build_model
from tiny_audio.precision import Precision
from tiny_audio.step import forward_backward

SETTINGS = {  # setting -> (frozen dtype, autocast)
    "bf16-mixed": (torch.bfloat16, True),
    "bf16-frozen": (torch.bfloat16, False),
    "fp32-mixed": (torch.float32, True),
    "fp32": (torch.float32, False),
}


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change: reset it around each test."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_auto_is_bf16_mixed_on_cuda_and_fp32_on_cpu() -> None:
    assert Precision.resolve("auto", device_type="cuda") == Precision("bf16-mixed", torch.bfloat16, True)
    assert Precision.resolve("auto", device_type="cpu") == Precision("fp32", torch.float32, False)
    for setting, (dtype, autocast) in SETTINGS.items():
        assert Precision.resolve(setting, device_type="cpu") == Precision(setting, dtype, autocast)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_a_training_step_in_every_precision(setting: str) -> None:
    frozen_dtype, autocast = SETTINGS[setting]
    cfg = tiny_config(f"training.precision={setting}")
    acc = make_accelerator(cfg)
    assert acc.mixed_precision == ("bf16" if autocast else "no")
    precision = Precision.resolve(cfg.training.precision, device_type=acc.device.type)
    model = build_model(cfg, device=acc.device, frozen_dtype=precision.frozen_dtype)
    stream = build_train_stream(data=cfg.data, batch_size=4, seed=0, count_tokens=model.prompt.count_label_tokens)
    try:
        batch = next(stream)
    finally:
        stream.close()
    first_linear = next(m for m in model.projector.modules() if isinstance(m, torch.nn.Linear))
    seen: list[torch.dtype] = []
    hook = first_linear.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        loss, tokens, _ = forward_backward(model, model, acc, [batch])
    finally:
        hook.remove()

    assert math.isfinite(float(loss)) and float(tokens) > 0
    assert {p.dtype for p in model.encoder.parameters()} == {frozen_dtype}
    assert {p.dtype for p in model.decoder.parameters()} == {frozen_dtype}
    assert seen == [torch.bfloat16 if autocast else torch.float32]  # the projector's maths
    for name, param in model.projector.named_parameters():
        assert param.dtype == torch.float32, name  # master weights
        assert param.grad is not None and param.grad.dtype == torch.float32, name
    assert any(p.grad.abs().sum() > 0 for p in model.projector.parameters())


def test_deepspeed_runs_bf16_only_where_autocast_is_asked_for() -> None:
    for setting, (_, autocast) in SETTINGS.items():
        cfg = tiny_config(f"training.precision={setting}", "training.deepspeed=zero2")
        assert deepspeed_config(cfg, world_size=1, grad_accum=1, cuda=True)["bf16"] == {"enabled": autocast}
        assert deepspeed_config(cfg, world_size=1, grad_accum=1, cuda=False)["bf16"] == {"enabled": False}
