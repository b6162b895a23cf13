"""One optimizer step's forward and backward, over its micro-batches and processes.

The gradient is that of (summed token loss over the WHOLE step) / (label tokens in the whole step, over every
micro-batch and rank), so a short transcript's tokens weigh what a long one's do, and the result does not depend
on how the global batch was split into micro-batches or processes.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from accelerate import Accelerator

from tiny_audio.distributed import uses_deepspeed
from tiny_audio.model.asr import ASRModel


def forward_backward(
    model: torch.nn.Module, raw: ASRModel, acc: Accelerator, micro_batches: list
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward + backward over one optimizer step's micro-batches; returns (summed loss, label tokens, aux loss).

    The gradient is that of (summed token loss over the WHOLE step) / (label tokens in the whole step, over every
    micro-batch and rank): averaging per micro-batch instead would weight a short transcript's tokens more than
    a long one's and make the result depend on how the batch was split.
    """
    device = acc.device
    step_tokens = sum(raw.prompt.count_label_tokens(text) for b in micro_batches for text in b.texts)
    global_tokens = acc.reduce(torch.tensor(float(step_tokens), device=device), reduction="sum")
    # DDP averages gradients over ranks, so each rank scales its summed loss by world size / global tokens.
    scale = acc.num_processes / global_tokens.clamp(min=1)
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    deepspeed = uses_deepspeed(acc)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = nullcontext() if last or deepspeed else acc.no_sync(model)
        with sync, acc.autocast():
            out = model(batch.audio.to(device, non_blocking=True), batch.audio_lengths.to(device), batch.texts)
            step_loss = out.loss_sum * scale + out.aux_loss / len(micro_batches)
            if deepspeed:
                # the engine reduces gradients at the boundary; the loss is already normalised over the whole
                # step, so it must not divide by the accumulation count again
                model.set_gradient_accumulation_boundary(last)
                model.backward(step_loss, scale_wrt_gas=False)
            else:
                acc.backward(step_loss)
        loss_sum += out.loss_sum.detach()
        aux_sum += out.aux_loss.detach() / len(micro_batches)
    return loss_sum, torch.tensor(float(step_tokens), device=device), aux_sum
