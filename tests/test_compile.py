"""torch.compile's fallback: a compile that fails never ends a run; the step runs again eagerly, once said."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from tiny_audio.compile import CompileGuard, compile_forward, is_compiled, uncompile


def broken_backend(graph: torch.fx.GraphModule, example_inputs: list) -> None:
    raise RuntimeError("no C compiler found (cc)")


def test_a_failed_compile_reruns_the_step_eagerly_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    expected = layer(x).sum()
    layer.forward = torch.compile(layer.forward, backend=broken_backend)  # what compile_forward does, broken
    resets = []
    guard = CompileGuard([layer], reset=lambda: resets.append(1))
    assert guard.active
    with caplog.at_level(logging.WARNING, logger="tiny_audio"):
        got = guard.run(lambda: layer(x).sum())
        again = guard.run(lambda: layer(x).sum())  # eager from now on: no second message
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(again, expected)
    assert resets == [1] and not guard.active and not is_compiled(layer)
    lines = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(lines) == 1 and "no C compiler found" in lines[0] and "training.compile=false" in lines[0]


def test_an_error_of_the_step_itself_is_not_taken_for_a_compile_failure() -> None:
    layer = nn.Linear(4, 3)
    compile_forward(layer)
    guard = CompileGuard([layer], reset=lambda: None)

    def step() -> torch.Tensor:
        raise ValueError("a bug in the step")

    with pytest.raises(ValueError, match="a bug in the step"):
        guard.run(step)
    assert guard.active and is_compiled(layer)
    uncompile(layer)
    assert not is_compiled(layer) and layer.forward.__func__ is nn.Linear.forward


def test_auto_compiles_on_a_gpu_only() -> None:
    from tiny_audio.compile import wanted

    assert wanted("auto", device_type="cuda") and not wanted("auto", device_type="cpu")
    assert wanted(True, device_type="cpu") and not wanted(False, device_type="cuda")


@pytest.mark.slow
def test_bucketed_lengths_do_not_recompile(tmp_path) -> None:
    """A short compiled run of the tiny experiment over batches of different lengths builds its graphs once (torch's
    own counters, logged as compile/graphs at every step)."""
    from test_train import read_metrics, run_entrypoint

    result = run_entrypoint(tmp_path, "training.compile=true", "training.max_steps=6", "training.save_steps=6")
    assert result.returncode == 0, result.stderr[-3000:]
    graphs = [m["compile/graphs"] for m in read_metrics(tmp_path)]
    assert graphs[0] > 0 and graphs == [graphs[0]] * 6, graphs
    assert "causing recompilation" not in result.stdout
    assert "torch.compile failed" not in result.stdout + result.stderr
