"""torch.compile for training: which parts, with what limits, how to see recompilation, and the way back to eager.

The projector and the decoder's body are compiled with dynamic shapes, so the bucketed batch lengths share one
graph instead of compiling one per length. Their `forward` is compiled in place (`Module.compile` would compile
`_call_impl`, which this torch version leaves uncompiled), so state-dict keys keep their names. Compiled kernels
are cached on disk (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR: the image puts them on the persistent volume), so a
restarted pod reuses them. A compile that fails never ends a run: the step is run again eagerly and training goes
on without compilation, after one line that says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

log = logging.getLogger("tiny_audio")

T = TypeVar("T")

RECOMPILE_LIMIT = 64
"""Graphs dynamo may keep per compiled function (its default, 8, is meant for a handful of static shapes)."""


def wanted(setting: bool | str, *, device_type: str) -> bool:
    """`training.compile`: true, false, or auto (on with CUDA, off on the CPU)."""
    return device_type == "cuda" if setting == "auto" else bool(setting)


def compile_forward(module: nn.Module, *, dynamic: bool = True) -> None:
    """Replace `module.forward` by its compiled version; `uncompile` restores it."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    module.forward = torch.compile(module.forward, dynamic=dynamic)  # type: ignore[method-assign]


def uncompile(module: nn.Module) -> None:
    """Back to the class's own (eager) forward."""
    module.__dict__.pop("forward", None)


def is_compiled(module: nn.Module) -> bool:
    return "forward" in module.__dict__


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (every recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompileGuard:
    """Runs training steps through compiled parts, and falls back to eager once if compiling fails.

    `modules` are the compiled parts (`ASRModel.compiled_parts()`); `reset` clears whatever a failed step left
    behind (the optimizer's gradients) before the step is run again eagerly.
    """

    def __init__(self, modules: list[nn.Module], *, reset: Callable[[], None]) -> None:
        self.modules = modules
        self.reset = reset
        self.active = any(is_compiled(m) for m in modules)
        self.reported_graphs = 0

    def run(self, step: Callable[..., T], *args: Any) -> T:
        """`step(*args)`, through the compiled parts while they work."""
        if not self.active:
            return step(*args)
        try:
            return step(*args)
        except (torch.OutOfMemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:
            if not _from_compiler(exc):
                raise
            self.fall_back(exc)
            self.reset()
            return step(*args)

    def fall_back(self, exc: BaseException) -> None:
        root, seen = exc, {id(exc)}
        while True:  # the compiler's own error, not dynamo's wrapper around it
            inner = getattr(root, "inner_exception", None) or root.__cause__ or root.__context__
            if inner is None or id(inner) in seen:
                break
            root = inner
            seen.add(id(root))
        text = str(root).strip()
        first = text.splitlines()[0][:300] if text else ""
        log.warning(
            "torch.compile failed (%s: %s): training on without compilation (training.compile=false skips it)",
            type(root).__name__,
            first,
        )
        for module in self.modules:
            uncompile(module)
        torch._dynamo.reset()
        self.active = False

    def metrics(self) -> dict[str, Any]:
        """`compile/graphs` while compiled, for the step's metrics; logs a line when recompilations happened."""
        if not self.active:
            return {}
        graphs = compiled_graphs()
        if self.reported_graphs and graphs > self.reported_graphs:
            log.info(
                "torch.compile: %d graphs so far (+%d since the last line): batch shapes are causing recompilation",
                graphs,
                graphs - self.reported_graphs,
            )
        self.reported_graphs = graphs
        return {"compile/graphs": graphs}


def _from_compiler(exc: BaseException) -> bool:
    """Whether an error came out of torch.compile's machinery (dynamo, AOTAutograd, Inductor, Triton, a C compiler)."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        module = type(error).__module__
        if module.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "triton")):
            return True
        if isinstance(error, torch._dynamo.exc.TorchDynamoException):
            return True
        error = error.__cause__ or error.__context__
    return False
