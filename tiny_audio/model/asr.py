"""Speech in, text out: log-mel -> frozen encoder -> projector -> spliced into the frozen decoder's chat prompt.

The prompt (`PromptBuilder`) is built by ONE object used by training and generation alike:
    <chat template user turn: "{instruction} " + N x <audio>> <assistant turn opener> | transcript <end of turn>
Labels cover only the transcript and the end-of-turn token. The decoder's logits are computed only at label
positions (the 151,936-wide vocabulary is never materialised for audio and prompt positions), in chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, PreTrainedTokenizerBase, WhisperFeatureExtractor

from tiny_audio.compile import compile_forward
from tiny_audio.model.augment import SpecAugment
from tiny_audio.model.encoder import AudioEncoder
from tiny_audio.model.features import LogMel
from tiny_audio.model.lora import adapter_parameters, has_adapters
from tiny_audio.model.sharding import gathered

IGNORE = -100
LOSS_CHUNK = 1024  # label positions per lm_head + cross-entropy chunk
# Transcripts whose token ids are kept: the data planner tokenises each sample (label-length filter) one window
# (batch_size x bucket_batches) plus the prefetch queue ahead of the step that needs the ids again, twice (the
# step's token count and the labels); with the cache the training loop's thread does not tokenise at all.
TRANSCRIPT_CACHE = 8192


class PromptBuilder:
    """Token ids of the chat prompt around N audio placeholders, and of a transcript's labels.

    The chat template is rendered once with a single placeholder and split around it, so a prompt for any
    number of audio tokens is prefix + [audio] * n + suffix. The end-of-turn token is the first token after the
    user's content (`<|im_end|>` for Qwen3), so the model learns to stop where a chat turn stops.

    Thinking is switched off (`enable_thinking=False`): Qwen3 is a hybrid reasoning model whose template then
    opens the assistant turn with an empty `<think>\n\n</think>\n\n` block, as the course renders it; without
    it a frozen Qwen3 is asked to skip the think block it opens on every answer. Templates that do not know the
    switch ignore it.
    """

    def __init__(self, *, tokenizer: PreTrainedTokenizerBase, instruction: str, audio_token: str) -> None:
        self.tokenizer = tokenizer
        self.audio_token = audio_token
        self.audio_id: int = tokenizer.convert_tokens_to_ids(audio_token)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{instruction} {audio_token}"}],
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=False,
        )
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if ids.count(self.audio_id) != 1:
            raise ValueError(f"the chat template must keep the audio placeholder {audio_token!r} as one token")
        split = ids.index(self.audio_id)
        self.prefix, self.suffix = ids[:split], ids[split + 1 :]
        self.end_of_turn_id: int = self.suffix[0]
        self._transcript_ids = lru_cache(maxsize=TRANSCRIPT_CACHE)(self._tokenize)  # thread-safe

    def _tokenize(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False).input_ids)

    def prompt(self, num_audio_tokens: int) -> list[int]:
        return [*self.prefix, *([self.audio_id] * num_audio_tokens), *self.suffix]

    def render(self) -> str:
        """The prompt as text, with one audio placeholder standing for the clip's audio tokens (for the log)."""
        return self.tokenizer.decode(self.prompt(1), skip_special_tokens=False)

    def labels(self, text: str) -> list[int]:
        return [*self._transcript_ids(text), self.end_of_turn_id]

    def count_label_tokens(self, text: str) -> int:
        return len(self._transcript_ids(text)) + 1


@dataclass
class DecoderInputs:
    inputs_embeds: torch.Tensor  # [B, L, D] prompt + transcript embeddings, audio spliced in
    attention_mask: torch.Tensor  # [B, L] 1 on real tokens, 0 on right padding
    labels: torch.Tensor  # [B, L] token ids to predict, IGNORE on prompt, audio and padding


class StepOutput(NamedTuple):
    """(A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 finds the tensors in a module's output to hook backward.)"""

    loss_sum: torch.Tensor  # summed cross-entropy over label tokens (normalise by the step's token count)
    num_tokens: int  # label tokens in this micro-batch
    aux_loss: torch.Tensor  # projector's auxiliary loss (MoE balance), already weighted


class ASRModel(nn.Module):
    def __init__(
        self,
        *,
        encoder: AudioEncoder,
        extractor: WhisperFeatureExtractor,
        projector: nn.Module,
        decoder: PreTrainedModel,
        prompt: PromptBuilder,
        encoder_padding: Literal["batch", "window"] = "batch",
        spec_augment: SpecAugment | None = None,
    ) -> None:
        super().__init__()
        self.encoder_padding = encoder_padding  # see ModelConfig.encoder_padding
        self.spec_augment = spec_augment  # applied in training mode only
        self.encoder = encoder
        self.feature_extractor = extractor  # its settings are saved with every checkpoint
        self.log_mel = LogMel(extractor=extractor, multiple=2 * projector.stack)
        self.projector = projector
        self.decoder = decoder
        self.prompt = prompt
        self.stack: int = projector.stack
        decoder.requires_grad_(False)
        for adapter in adapter_parameters(decoder):  # LoRA (the second stage) trains with the projector
            adapter.requires_grad_(True)
        self.decoder_trains = has_adapters(decoder)
        decoder.eval()

    def compile_parts(self, *, dynamic: bool = True) -> None:
        """torch.compile the projector and the decoder body in place (tiny_audio.compile.compile_forward: their
        state-dict keys are unchanged, and the calls `forward` makes are the compiled ones). dynamic=True: one
        graph serves every bucketed batch length instead of one recompile per shape."""
        for module in self.compiled_parts():
            compile_forward(module, dynamic=dynamic)

    def compiled_parts(self) -> list[nn.Module]:
        return [self.projector, self.decoder.base_model]

    def train(self, mode: bool = True) -> ASRModel:
        # The frozen parts keep dropout off; a decoder with LoRA adapters trains them (their dropout on).
        super().train(mode)
        self.encoder.train(False)
        self.decoder.train(mode and self.decoder_trains)
        return self

    # -- audio -> embeddings (each stage is a method, so the benchmark can time them one by one) -------------
    def encode(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """audio [B, S] + lengths [B] -> embeddings [B, T', D], audio tokens per clip [B], aux_loss."""
        features, frame_lengths = self.features(audio, lengths)
        hidden, enc_lengths = self.encode_features(features, frame_lengths)
        return self.project(hidden, enc_lengths)

    def features(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, S] + lengths [B] -> log-mel [B, n_mels, T_mel] + valid frames per clip [B].

        `batch` padding: T_mel covers the batch's longest clip and padded frames are zero. `window`: every clip is
        padded to 30 s and its log-mel taken over the whole window, as Whisper's feature extractor (GLM-ASR's
        processor) does, so the padding carries the clip's silence floor instead of zeros. In training mode,
        SpecAugment's masks are applied (data.spec_augment).
        """
        if self.encoder_padding == "window":
            features, frame_lengths = self.log_mel.windowed(audio, lengths)
        else:
            features, frame_lengths = self.log_mel(audio, lengths)
        if self.training and self.spec_augment is not None:
            features = self.spec_augment(features, frame_lengths)
        return features, frame_lengths

    def encode_features(self, features: torch.Tensor, frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log-mel [B, n_mels, T_mel] -> frozen encoder states [B, T_enc, C] + valid frames per clip [B]."""
        # no_grad, not inference_mode: no autograd graph or saved activations either way, but ZeRO-3's hooks
        # gather the encoder's partitioned weights into ordinary tensors, which inference mode forbids, and
        # inference tensors could not be saved for backward by the projector without a copy.
        with torch.no_grad():
            return self.encoder(features.to(self.encoder_dtype), frame_lengths, mask=self.encoder_padding == "batch")

    def project(
        self, hidden: torch.Tensor, enc_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """encoder states [B, T_enc, C] -> embeddings [B, T', D], audio tokens per clip [B], aux_loss."""
        num_tokens = torch.div(enc_lengths, self.stack, rounding_mode="floor").clamp(min=1)  # [B]
        t_out = hidden.shape[1] // self.stack
        mask = torch.arange(t_out, device=hidden.device)[None, :] < num_tokens[:, None]  # [B, T']
        # the projector reads the (possibly bf16) frozen states in its own dtype: fp32 master weights without
        # autocast would otherwise meet a bf16 input in their first matmul
        hidden = hidden.to(next(self.projector.parameters()).dtype)
        embeddings, aux = self.projector(hidden, mask)  # [B, T', D]
        return embeddings, num_tokens, aux

    @property
    def encoder_dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    # -- training ------------------------------------------------------------------------------------------
    def forward(self, audio: torch.Tensor, lengths: torch.Tensor, texts: Sequence[str]) -> StepOutput:
        features, frame_lengths = self.features(audio, lengths)
        hidden, enc_lengths = self.encode_features(features, frame_lengths)
        embeddings, num_audio, aux = self.project(hidden, enc_lengths)
        inputs = self.decoder_inputs(embeddings, num_audio, texts)
        loss_sum, num_tokens = self.decoder_loss(inputs)
        return StepOutput(loss_sum=loss_sum, num_tokens=num_tokens, aux_loss=aux)

    def decoder_inputs(self, embeddings: torch.Tensor, num_audio: torch.Tensor, texts: Sequence[str]) -> DecoderInputs:
        """Chat prompt + transcript per clip, audio spliced in, right-padded to the batch's longest row."""
        rows = [self.prompt.prompt(int(n)) for n in num_audio.tolist()]
        labels = [[IGNORE] * len(row) + self.prompt.labels(text) for row, text in zip(rows, texts, strict=True)]
        rows = [row + lab[len(row) :] for row, lab in zip(rows, labels, strict=True)]
        input_ids, attention_mask = self._pad_right(rows, self.pad_id)
        label_ids, _ = self._pad_right(labels, IGNORE)
        inputs_embeds = self.splice(input_ids, embeddings, num_audio)
        return DecoderInputs(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=label_ids)

    def decoder_loss(self, inputs: DecoderInputs) -> tuple[torch.Tensor, int]:
        """Frozen decoder over the spliced prompt; summed cross-entropy at label positions and their count."""
        hidden = self.decoder.base_model(
            inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, use_cache=False
        ).last_hidden_state  # [B, L, H]; use_cache=False: no key/value cache is built in training
        # Position t predicts token t+1: keep only positions whose next token is a label.
        targets = inputs.labels[:, 1:]
        keep = targets != IGNORE
        return self.label_loss(hidden[:, :-1][keep], targets[keep]), int(keep.sum())

    def label_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of lm_head(hidden) [N, H] against targets [N], LOSS_CHUNK rows at a time.

        The frozen head goes through `LinearCrossEntropy`: each chunk's logits live only while that chunk is
        processed, and the gradient for `hidden` is taken in the same pass, so the head runs once, not twice.
        A trainable head (not used here) falls back to recomputing each chunk in backward.
        """
        head = self.decoder.get_output_embeddings()
        if not head.weight.requires_grad:
            # the head's weight is read outside its own forward, so ZeRO-3 does not gather it by itself
            with gathered([p for p in (head.weight, head.bias) if p is not None]):
                return LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, LOSS_CHUNK)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], LOSS_CHUNK):
            h, t = hidden[start : start + LOSS_CHUNK], targets[start : start + LOSS_CHUNK]
            total = total + checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
        return total

    def splice(self, input_ids: torch.Tensor, embeddings: torch.Tensor, num_audio: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, L, D] with each row's audio placeholders replaced by its audio embeddings."""
        is_audio = input_ids == self.prompt.audio_id  # [B, L]
        # The placeholder id may lie outside the embedding table (it is added to the tokenizer only): look up pad.
        token_embeds = self.decoder.get_input_embeddings()(input_ids.masked_fill(is_audio, self.pad_id))
        t_out = embeddings.shape[1]
        valid = torch.arange(t_out, device=input_ids.device)[None, :] < num_audio[:, None]  # [B, T']
        audio = embeddings[valid].to(token_embeds.dtype)  # [sum(n), D], row-major = placeholder order
        return token_embeds.masked_scatter(is_audio.unsqueeze(-1), audio)

    # -- inference -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, audio: torch.Tensor, lengths: torch.Tensor, *, max_new_tokens: int = 128) -> list[str]:
        """Greedy transcripts of a batch, from exactly the training prompt (left-padded for batching)."""
        embeddings, num_audio, _ = self.encode(audio, lengths)
        rows = [self.prompt.prompt(int(n)) for n in num_audio.tolist()]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=audio.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=audio.device)
        inputs_embeds = self.splice(input_ids, embeddings, num_audio)
        out = self.decoder.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.prompt.end_of_turn_id,
            pad_token_id=self.pad_id,
        )
        return [self.prompt.tokenizer.decode(row[row != self.pad_id], skip_special_tokens=True).strip() for row in out]

    # -- helpers -------------------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        tok = self.prompt.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else self.prompt.end_of_turn_id

    def _pad_right(self, rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        device = self.decoder.device
        ids = torch.tensor([r + [value] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        return ids, mask


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias` against `targets`, for a FROZEN weight, in row chunks.

    Forward computes each chunk's logits [chunk, vocab] in float32, its loss, and at once the gradient with
    respect to its hidden rows, (softmax - one_hot) @ weight; the logits are then dropped. Backward only scales
    that stored gradient [N, H]. So the vocabulary-wide tensor exists for one chunk at a time and the head matmul
    is not repeated in backward (activation checkpointing would run it twice). No weight gradient is ever formed.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk: int,
    ) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        total = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(hidden) if want_grad else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = F.linear(hidden[rows], weight, bias).float()  # [c, V]
            target = targets[rows]
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            total = total + (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
            if want_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(target.shape[0], device=target.device), target] -= 1.0
                grad[rows] = probs.to(weight.dtype) @ weight  # [c, H]
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None
