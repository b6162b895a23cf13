"""Hub-shaped stand-ins for the real run's repositories, under their real names, for the rehearsal test.

Each builder writes a folder laid out like the public repository (file names, config formats, tensor names,
shard layout), with random weights at the REAL widths, head counts and vocabularies and only the layer counts
cut, so a CPU runs the real recipe in minutes. `tests/hub_server.py` serves the folders as Hub repos.

    GLM_ASR      zai-org/GLM-ASR-Nano-2512: the whole GlmAsrForConditionalGeneration (audio tower, adapter and
                 Llama LLM) as transformers saves it, plus its processor files. Sharded with an index (the public
                 repo holds one model.safetensors), so the tower-only download reads the index, skips the shard
                 without tower tensors and fetches a tower that is a prefix of a shard also holding the LLM.
    QWEN3_*      Qwen/Qwen3-0.6B and Qwen/Qwen3-1.7B: config.json and generation_config.json in the public files'
                 format (transformers 4.51 keys, sampling defaults), tied embeddings, a byte-level BPE padded so
                 that Qwen3's added tokens keep their real ids, a Qwen3-like chat template. The random weights
                 are given one feature that makes the decoder end its turn (<|im_end|>) one token after the
                 assistant turn opens (see `_end_turns_early`): a random decoder otherwise writes max_new_tokens
                 tokens for every clip, each reading the whole 151,936-row output matrix, which on a CPU costs
                 minutes per evaluation and is not what the real, pretrained decoder does.
    LOQUACIOUS   speechbrain/LoquaciousSet (a dataset repo): its configs, folders, shard names and columns, with
                 espeak-ng speech and UPPER-CASE transcripts.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

GLM_ASR = "zai-org/GLM-ASR-Nano-2512"
QWEN3_SMALL = "Qwen/Qwen3-0.6B"
QWEN3_LARGE = "Qwen/Qwen3-1.7B"
LOQUACIOUS = "speechbrain/LoquaciousSet"

# Layers kept of each stack (the real counts: tower 32, GLM-ASR's LLM 28, Qwen3 28). Widths are never cut.
TOWER_LAYERS = 2
GLM_LLM_LAYERS = 1
QWEN3_LAYERS = 2
# The index is written with shards of at most this size: the tower and the LLM's embedding table share the first
# shard (the tower is its prefix, as it is of the public single file), the LLM's layers and the adapter the second.
GLM_SHARD_SIZE = "400MB"
SAMPLE_RATE = 16_000


# --- GLM-ASR-Nano-2512 --------------------------------------------------------------------------------------------


def build_glm_asr(out: Path, *, seed: int = 0) -> Path:
    """The whole GLM-ASR model at the real widths (layers cut), bf16, sharded, plus its processor files."""
    import torch
    from transformers import GlmAsrConfig, GlmAsrForConditionalGeneration, GlmAsrProcessor, WhisperFeatureExtractor

    # GlmAsrConfig's defaults are GLM-ASR-Nano-2512's (tower 1280 wide, 20 heads, 128 mel; Llama LLM 2048 wide,
    # 16 heads / 4 KV heads, vocabulary 59,264): only the layer counts change.
    config = GlmAsrConfig(
        audio_config={"num_hidden_layers": TOWER_LAYERS}, text_config={"num_hidden_layers": GLM_LLM_LAYERS}
    )
    torch.manual_seed(seed)
    model = GlmAsrForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size=GLM_SHARD_SIZE)
    specials = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_audio|>"]
    tokenizer = _small_tokenizer(specials=[*specials, "<|end_of_audio|>"], eos="<|endoftext|>")
    processor = GlmAsrProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer, chat_template=_GLM_TEMPLATE
    )
    processor.save_pretrained(out)
    _write_readme(out, "GLM-ASR-Nano-2512 stand-in: random weights at the real widths, layers cut.")
    return out


# A GLM-style template (the trainer never renders it: only the tower is used).
_GLM_TEMPLATE = (
    "{%- for m in messages -%}\n<|{{ m.role }}|>\n{{ m.content if m.content is string else "
    "'<|begin_of_audio|><|pad|><|end_of_audio|>' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n"
    "<|assistant|>\n{% endif -%}"
)


@dataclass(frozen=True)
class TensorSpan:
    file: str
    start: int  # byte offset in the file (header included)
    stop: int


def tensor_spans(folder: Path, prefix: str) -> list[TensorSpan]:
    """Where the tensors named `prefix*` lie in a local checkpoint's safetensors files (absolute byte offsets)."""
    spans = []
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        for name, info in header.items():
            if name.startswith(prefix):
                begin, end = info["data_offsets"]
                spans.append(TensorSpan(path.name, 8 + size + begin, 8 + size + end))
    return spans


def safetensors_header_bytes(path: Path) -> int:
    """The 8-byte length plus the JSON header of a safetensors file."""
    with path.open("rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


# --- Qwen3 --------------------------------------------------------------------------------------------------------

QWEN3_VOCAB = 151_936
QWEN3_WIDTHS = {QWEN3_SMALL: (1024, 3072), QWEN3_LARGE: (2048, 6144)}  # hidden, intermediate
# Qwen3's added tokens from id 151,643 on, in order; False: not special (kept when decoding).
QWEN3_ADDED_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
QWEN3_FIRST_ADDED_ID = 151_643
# Qwen2/Qwen3's pre-tokenizer split (contractions, letters, single digits, punctuation runs, newlines, spaces).
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3-like: ChatML turns; the generation prompt opens the assistant turn and, only when enable_thinking is passed
# as false, closes an empty thinking block; the final assistant turn carries an empty thinking block.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def build_qwen3(out: Path, repo_id: str, *, texts: Sequence[str], seed: int = 0) -> Path:
    """A Qwen3 repo at the real widths of `repo_id` (layers cut), bf16, in the public repo's file layout."""
    import torch
    from transformers import AutoConfig, Qwen3ForCausalLM

    hidden, intermediate = QWEN3_WIDTHS[repo_id]
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": 16,
        "num_hidden_layers": QWEN3_LAYERS,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": QWEN3_VOCAB,
    }
    generation = {
        "bos_token_id": 151643,
        "do_sample": True,
        "eos_token_id": [151645, 151643],
        "pad_token_id": 151643,
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
        "transformers_version": "4.51.0",
    }
    weights = out / "weights"
    torch.manual_seed(seed)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    turn_openers = _write_qwen3_tokenizer(out, texts=texts)
    model = Qwen3ForCausalLM._from_config(AutoConfig.from_pretrained(out), dtype=torch.bfloat16)
    _end_turns_early(model, quiet=turn_openers, end_of_turn=QWEN3_FIRST_ADDED_ID + 2)
    # The 1.7B model is published in two shards with an index, the 0.6B one as a single file.
    model.save_pretrained(weights, max_shard_size="500MB" if repo_id == QWEN3_LARGE else "50GB")
    for path in weights.iterdir():
        if path.name.endswith((".safetensors", ".index.json")):
            shutil.move(path, out / path.name)
    shutil.rmtree(weights)
    # the public files as they are, written after save_pretrained so its own formats do not replace them
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    _write_readme(out, f"{repo_id.split('/')[1]} stand-in: random weights at the real widths, layers cut.")
    return out


def _end_turns_early(model: Any, *, quiet: set[int], end_of_turn: int) -> None:
    """Make a random tied-embedding decoder close its turn right after its first token.

    Dimension 0 of the residual stream becomes a "stop" feature that the layers never write (row 0 of every
    o_proj and down_proj is zero), so at each position it is what the token's embedding says: STOP for every
    token, 0 for the `quiet` tokens that end a generation prompt, 4 x STOP for <|im_end|>. With tied embeddings
    the output row of <|im_end|> then wins wherever the current token carries the feature: after the prompt
    (a quiet token) the decoder writes one ordinary token, then ends its turn.
    """
    import torch

    stop = 4.0  # large against the logits' noise at either real width
    with torch.no_grad():
        table = model.get_input_embeddings().weight
        table[:, 0] = stop
        table[sorted(quiet), 0] = 0.0
        table[end_of_turn, 0] = 4 * stop
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0


def _write_qwen3_tokenizer(out: Path, *, texts: Sequence[str]) -> set[int]:
    """tokenizer.json, vocab.json, merges.txt and tokenizer_config.json as the public Qwen3 repos hold them: a
    byte-level BPE trained on `texts`, padded with word-like entries so the added tokens start at id 151,643.
    Returns the ids of the tokens a generation prompt ends with (its newlines)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    def dress(tokenizer: Tokenizer) -> Tokenizer:
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        return tokenizer

    trained = dress(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trained.train_from_iterator([*texts, *(t.lower() for t in texts), *(t.upper() for t in texts)], trainer)
    model = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # never produced by a merge: entries that only fill the table, decoding to word-like pieces (" abc")
    letters = "abcdefghijklmnopqrstuvwxyz"
    fillers = (f"Ġ{a}{b}{c}{d}" for a in letters for b in letters for c in letters for d in ["", *letters])
    while len(vocab) < QWEN3_FIRST_ADDED_ID:
        filler = next(fillers)
        if filler not in vocab:
            vocab[filler] = len(vocab)
    tokenizer = dress(Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)))
    for content, special in QWEN3_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False)
        tokenizer.add_special_tokens([token]) if special else tokenizer.add_tokens([token])
    assert tokenizer.token_to_id("<think>") == 151667 and tokenizer.token_to_id("</think>") == 151668
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    decoder = {
        str(QWEN3_FIRST_ADDED_ID + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in enumerate(QWEN3_ADDED_TOKENS)
    }
    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [c for c, special in QWEN3_ADDED_TOKENS[1:14] if special],
        "bos_token": None,
        "chat_template": QWEN3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return {i for text in ("\n", "\n\n") for i in tokenizer.encode(text).ids}


def _small_tokenizer(*, specials: list[str], eos: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    bpe.train_from_iterator(["please transcribe this audio into text"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=eos)


def _write_readme(out: Path, text: str) -> None:
    (out / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n{text}\n")
    (out / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")


# --- LoquaciousSet ------------------------------------------------------------------------------------------------

LOQUACIOUS_CONFIGS = ("large", "clean", "medium", "small")
# Sentences spoken for the stand-in corpus (short, so clips last 1-2 s); transcripts are stored UPPER-CASE as the
# corpus holds them.
SENTENCES = (
    "the cat sat on the mat",
    "open the window please",
    "we walked to the station",
    "my brother likes green apples",
    "the train was late again",
    "turn off the kitchen light",
    "she bought a new bike",
    "it is raining in the city",
    "put the book on the table",
    "the dog ran into the garden",
    "call me after lunch",
    "the river is very cold",
    "he fixed the old radio",
    "bring two cups of tea",
    "the market opens at nine",
    "our teacher reads a story",
    "close the door behind you",
    "the children sang a song",
    "a bird sat on the roof",
    "we need more bread",
    "the museum was quiet",
    "she found her red scarf",
    "the boat left the harbor",
    "my phone is on the desk",
    "they painted the fence white",
    "the clock stopped at noon",
    "wash your hands first",
    "the shop sells fresh fish",
)
# Rows per split shard, as (config folder, split file prefix) -> rows in each shard.
LOQUACIOUS_LAYOUT: dict[tuple[str, str], tuple[int, ...]] = {
    ("medium", "train"): (10, 10),
    ("dev", "dev"): (2, 2),
    ("test", "test"): (2,),
    ("small", "train"): (2,),
    ("large", "train"): (2,),
    ("clean", "train"): (2,),
}
_LOQUACIOUS_SCHEMA = pa.schema(
    [
        pa.field("ID", pa.string()),
        pa.field("duration", pa.float32()),
        pa.field("wav", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
        pa.field("spk_id", pa.string()),
        pa.field("sex", pa.string()),
        pa.field("text", pa.string()),
    ]
)
_LOQUACIOUS_FEATURES = [
    {"name": "ID", "dtype": "string"},
    {"name": "duration", "dtype": "float32"},
    {"name": "wav", "dtype": {"audio": {"sample_rate": 16000, "decode": False}}},
    {"name": "spk_id", "dtype": "string"},
    {"name": "sex", "dtype": "string"},
    {"name": "text", "dtype": "string"},
]


def speak(text: str, *, index: int) -> np.ndarray:
    """espeak-ng speech of `text` at 16 kHz (a seeded voice per index)."""
    from tools.miniatures.corpus import plan
    from tools.miniatures.corpus import speak as espeak

    utterance = plan(texts=[text], seed=index)[0]
    return espeak(utterance)


def wav_bytes(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def build_loquacious(out: Path) -> Path:
    """The LoquaciousSet dataset repo: README with its `configs:`, parquet shards in its folders, CSV manifests."""
    out.mkdir(parents=True, exist_ok=True)
    rows_needed = sum(sum(shards) for shards in LOQUACIOUS_LAYOUT.values())
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(rows_needed)]
    waves = [speak(text, index=i) for i, text in enumerate(texts)]
    row = 0
    manifests: dict[str, list[str]] = {}
    for (folder, prefix), shards in LOQUACIOUS_LAYOUT.items():
        for shard, count in enumerate(shards):
            ids, items = [], range(row, row + count)
            for i in items:
                ids.append(f"{folder}_{prefix}_{i:05d}")
            table = pa.table(
                {
                    "ID": ids,
                    "duration": [len(waves[i]) / SAMPLE_RATE for i in items],
                    "wav": [{"bytes": wav_bytes(waves[i]), "path": f"{ids[k]}.wav"} for k, i in enumerate(items)],
                    "spk_id": [f"spk{i % 5}" for i in items],
                    "sex": ["M" if i % 2 else "F" for i in items],
                    "text": [texts[i].upper() for i in items],
                },
                schema=_LOQUACIOUS_SCHEMA,
            )
            path = out / folder / f"{prefix}-{shard:05d}-of-{len(shards):05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
            manifests.setdefault(folder, []).extend(
                f"{ids[k]},{len(waves[i]) / SAMPLE_RATE:.2f},{texts[i].upper()}" for k, i in enumerate(items)
            )
            row += count
    for folder, lines in manifests.items():
        name = f"largescaleasr_{folder}_train.csv" if folder in LOQUACIOUS_CONFIGS else f"largescaleasr_{folder}.csv"
        (out / name).write_text("ID,duration,text\n" + "\n".join(lines) + "\n")
    (out / "README.md").write_text(_loquacious_readme())
    (out / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    return out


def loquacious_texts(out: Path, folder: str) -> list[str]:
    """Every transcript of one folder's shards (as stored: upper case)."""
    return [t for path in sorted((out / folder).glob("*.parquet")) for t in pq.read_table(path)["text"].to_pylist()]


def _loquacious_readme() -> str:
    import yaml

    configs = [
        {
            "config_name": name,
            "features": _LOQUACIOUS_FEATURES,
            "data_files": [
                {"split": "train", "path": f"{name}/train*"},
                {"split": "dev", "path": "dev/dev*"},
                {"split": "test", "path": "test/test*"},
            ],
        }
        for name in LOQUACIOUS_CONFIGS
    ]
    meta = {
        "language": ["en"],
        "license": ["cc-by-3.0", "cc-by-4.0"],
        "task_categories": ["automatic-speech-recognition"],
        "pretty_name": "LargeScaleASR",
        "configs": configs,
    }
    body = "Stand-in for the Loquacious Set: a few espeak-ng clips per split, in the public repo's layout.\n"
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n{body}"
