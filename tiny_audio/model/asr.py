"""Speech in, text out: log-mel -> frozen encoder -> projector -> spliced into the frozen decoder's chat prompt.

The prompt (`PromptBuilder`) is built by ONE object used by training and generation alike:
    <chat template user turn: "{instruction} " + N x <audio>> <assistant turn opener> | transcript <end of turn>
Labels cover only the transcript and the end-of-turn token. The decoder's logits are computed only at label
positions (the 151,936-wide vocabulary is never materialised for audio and prompt positions), in chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, PreTrainedTokenizerBase, WhisperFeatureExtractor

from tiny_audio.model.encoder import AudioEncoder
from tiny_audio.model.features import LogMel

IGNORE = -100
LOSS_CHUNK = 1024  # label positions per lm_head + cross-entropy chunk


class PromptBuilder:
    """Token ids of the chat prompt around N audio placeholders, and of a transcript's labels.

    The chat template is rendered once with a single placeholder and split around it, so a prompt for any
    number of audio tokens is prefix + [audio] * n + suffix. The end-of-turn token is the first token after the
    user's content (`<|im_end|>` for Qwen3), so the model learns to stop where a chat turn stops. No thinking
    block appears: the assistant turn is opened exactly as the template opens it for generation.
    """

    def __init__(self, *, tokenizer: PreTrainedTokenizerBase, instruction: str, audio_token: str) -> None:
        self.tokenizer = tokenizer
        self.audio_token = audio_token
        self.audio_id: int = tokenizer.convert_tokens_to_ids(audio_token)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{instruction} {audio_token}"}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if ids.count(self.audio_id) != 1:
            raise ValueError(f"the chat template must keep the audio placeholder {audio_token!r} as one token")
        split = ids.index(self.audio_id)
        self.prefix, self.suffix = ids[:split], ids[split + 1 :]
        self.end_of_turn_id: int = self.suffix[0]

    def prompt(self, num_audio_tokens: int) -> list[int]:
        return [*self.prefix, *([self.audio_id] * num_audio_tokens), *self.suffix]

    def labels(self, text: str) -> list[int]:
        return [*self.tokenizer(text, add_special_tokens=False).input_ids, self.end_of_turn_id]

    def count_label_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids) + 1


@dataclass
class StepOutput:
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
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.feature_extractor = extractor  # its settings are saved with every checkpoint
        self.log_mel = LogMel(extractor=extractor)
        self.projector = projector
        self.decoder = decoder
        self.prompt = prompt
        self.stack: int = projector.stack
        decoder.requires_grad_(False)
        decoder.eval()

    def train(self, mode: bool = True) -> ASRModel:
        # Only the projector ever trains; the frozen parts keep dropout off.
        super().train(mode)
        self.encoder.train(False)
        self.decoder.train(False)
        return self

    # -- audio -> embeddings -------------------------------------------------------------------------------
    def encode(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """audio [B, S] + lengths [B] -> embeddings [B, T', D], audio tokens per clip [B], aux_loss."""
        with torch.inference_mode():
            features, frame_lengths = self.log_mel(audio, lengths)  # [B, n_mels, T_mel]
            hidden, enc_lengths = self.encoder(features.to(self.encoder_dtype), frame_lengths)  # [B, T_enc, C]
        hidden = hidden.clone()  # leave inference mode: the projector saves its input for backward
        num_tokens = torch.div(enc_lengths, self.stack, rounding_mode="floor").clamp(min=1)  # [B]
        t_out = hidden.shape[1] // self.stack
        mask = torch.arange(t_out, device=hidden.device)[None, :] < num_tokens[:, None]  # [B, T']
        embeddings, aux = self.projector(hidden, mask)  # [B, T', D]
        return embeddings, num_tokens, aux

    @property
    def encoder_dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    # -- training ------------------------------------------------------------------------------------------
    def forward(self, audio: torch.Tensor, lengths: torch.Tensor, texts: Sequence[str]) -> StepOutput:
        embeddings, num_audio, aux = self.encode(audio, lengths)
        rows = [self.prompt.prompt(int(n)) for n in num_audio.tolist()]
        labels = [[IGNORE] * len(row) + self.prompt.labels(text) for row, text in zip(rows, texts, strict=True)]
        rows = [row + lab[len(row) :] for row, lab in zip(rows, labels, strict=True)]
        input_ids, attention_mask = self._pad_right(rows, self.pad_id)
        label_ids, _ = self._pad_right(labels, IGNORE)
        inputs_embeds = self.splice(input_ids, embeddings, num_audio)
        hidden = self.decoder.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        # Position t predicts token t+1: keep only positions whose next token is a label.
        targets = label_ids[:, 1:]
        keep = targets != IGNORE
        loss_sum = self.label_loss(hidden[:, :-1][keep], targets[keep])
        return StepOutput(loss_sum=loss_sum, num_tokens=int(keep.sum()), aux_loss=aux)

    def label_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of lm_head(hidden) [N, H] against targets [N], LOSS_CHUNK rows at a time.

        Each chunk is recomputed in backward instead of keeping its [chunk, vocab] logits alive, so peak memory
        is one chunk's logits whatever the number of label tokens.
        """
        head = self.decoder.get_output_embeddings()
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], LOSS_CHUNK):
            h, t = hidden[start : start + LOSS_CHUNK], targets[start : start + LOSS_CHUNK]
            if torch.is_grad_enabled() and h.requires_grad:
                total = total + checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
            else:
                total = total + _chunk_loss(head, h, t)
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
