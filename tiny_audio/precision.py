"""The number formats of a run, from one setting (`training.precision`): how the frozen parts are stored and
whether forwards run under bf16 autocast. The projector's own weights are always fp32 (its master weights).

    setting       frozen encoder/decoder   forward              when
    bf16-mixed    bf16                     bf16 autocast        the course's bf16; the default on CUDA
    bf16-frozen   bf16                     projector in fp32    fp32 projector maths, half the frozen memory
    fp32-mixed    fp32                     bf16 autocast        frozen parts kept exact, bf16 matmuls
    fp32          fp32                     no autocast          the default on CPU; reference numerics

Whatever the combination, the projector reads the encoder's states in its own dtype and the decoder reads the
projector's output in the decoder's dtype, so no matmul ever meets two dtypes.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    name: str
    frozen_dtype: torch.dtype
    autocast: bool

    @classmethod
    def resolve(cls, setting: str, *, device_type: str) -> Precision:
        """`auto` -> bf16-mixed on CUDA, fp32 elsewhere; every other setting is taken as written."""
        if setting == "auto":
            setting = "bf16-mixed" if device_type == "cuda" else "fp32"
        frozen = torch.bfloat16 if setting.startswith("bf16") else torch.float32
        return cls(name=setting, frozen_dtype=frozen, autocast=setting.endswith("-mixed"))

    @property
    def accelerate_mixed_precision(self) -> str:
        """What `Accelerator(mixed_precision=...)` is given: it then wraps forwards in the same autocast."""
        return "bf16" if self.autocast else "no"

    def context(self, device_type: str) -> AbstractContextManager:
        """bf16 autocast on `device_type` when this precision asks for it (a no-op context otherwise)."""
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.autocast)
