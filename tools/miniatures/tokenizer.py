"""A real byte-level BPE tokenizer trained on the corpus text, with Qwen's ChatML special tokens.

Why not `Qwen2Tokenizer(vocab_file=..., merges_file=...)`: it silently yields a 1-token tokenizer. The
`tokenizers` object is wrapped in `PreTrainedTokenizerFast` and round-trips through `AutoTokenizer`.
No `<audio>` token is added here: the trainer adds its own placeholder.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)
# The trainer's default user-turn instruction (ModelConfig.instruction): the tokenizer learns it as whole tokens,
# and the decoders are pretrained with it in the prompt.
INSTRUCTION = "Transcribe the audio."

# ChatML as Qwen3 renders it for our use, without a thinking block:
# [user c] + generation prompt -> "<|im_start|>user\n{c}<|im_end|>\n<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(*, texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts` with `vocab_size` entries (256 bytes + merges + the 3 special tokens).

    Deterministic: the same texts and vocab_size give the same tokenizer.json.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        chat_template=CHAT_TEMPLATE,
        pad_token=PAD,
        eos_token=IM_END,
        unk_token=None,
        bos_token=None,
        model_max_length=4096,
    )
