"""The shipped miniature assets load through the production paths, and the build scripts reproduce them."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from datasets import load_dataset
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import (
    AutoTokenizer,
    GlmAsrEncoder,
    GlmAsrEncoderConfig,
    Qwen3ForCausalLM,
    WhisperFeatureExtractor,
)

from tests.ci import require_tools
from tiny_audio.assets import ASSETS_DIR, resolve_asset
from tiny_audio.config import ModelConfig
from tiny_audio.errors import UserError
from tools.miniatures import corpus
from tools.miniatures.build import INSTRUCTION, TINY_EVAL, TINY_SEED, TINY_TRAIN, build_tiny, tiny_sentences
from tools.miniatures.mini import MINI_EVAL, MINI_TRAIN, MINI_VOCAB, mini_sentences
from tools.miniatures.models import TOWER_KEY_MAPPING
from tools.miniatures.tokenizer import train_tokenizer

ASSET_SETS = ["tiny", "mini"]
# (train rows, eval rows, max corpus MB) per asset set.
CORPUS_SIZES = {"tiny": (TINY_TRAIN, TINY_EVAL, 5.0), "mini": (MINI_TRAIN, MINI_EVAL, 10.0)}
SENTENCES = {"tiny": tiny_sentences, "mini": mini_sentences}


def _shards(name: str, split: str) -> list[str]:
    return sorted(str(p) for p in (ASSETS_DIR / name / "data").glob(f"{split}-*.parquet"))


def test_resolve_asset_maps_the_scheme_and_passes_other_refs_through() -> None:
    assert resolve_asset("asset://tiny/encoder") == str(ASSETS_DIR / "tiny" / "encoder")
    assert Path(resolve_asset("asset://tiny/encoder")).is_absolute()
    for ref in ("Qwen/Qwen3-0.6B", "/abs/dir", "rel/dir", "hf://datasets/x/y"):
        assert resolve_asset(ref) == ref
    for bad in ("asset://", "asset://../../etc"):
        with pytest.raises(UserError):
            resolve_asset(bad)


def test_the_build_instruction_is_the_trainer_default() -> None:
    assert ModelConfig().instruction == INSTRUCTION


@pytest.mark.parametrize("name", ASSET_SETS)
def test_tokenizer_round_trips_with_chatml(name: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(resolve_asset(f"asset://{name}/decoder"))
    assert 500 <= len(tokenizer) <= 1100
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.unk_token_id
    assert "<audio>" not in tokenizer.get_vocab()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Transcribe the audio. x"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nTranscribe the audio. x<|im_end|>\n<|im_start|>assistant\n"
    sentence = SENTENCES[name]()[1][0]
    ids = tokenizer(sentence).input_ids
    assert tokenizer.decode(ids) == sentence
    # A real BPE: a corpus sentence takes about one token per word, not one per byte.
    assert len(ids) <= 2 * len(sentence.split())


@pytest.mark.parametrize("name", ASSET_SETS)
def test_encoder_tower_loads_with_no_missing_keys(name: str) -> None:
    path = resolve_asset(f"asset://{name}/encoder")
    tower, info = GlmAsrEncoder.from_pretrained(
        path, key_mapping=TOWER_KEY_MAPPING, output_loading_info=True, dtype=torch.float32
    )
    assert not info["missing_keys"]
    assert GlmAsrEncoderConfig.from_pretrained(path).hidden_size == tower.config.hidden_size
    extractor = WhisperFeatureExtractor.from_pretrained(path)
    assert (extractor.feature_size, extractor.sampling_rate, extractor.hop_length) == (128, 16_000, 160)
    clips, _ = corpus.read_shard(Path(_shards(name, "eval")[0]))
    features = extractor(clips[0], sampling_rate=16_000, return_tensors="pt", padding=False).input_features
    with torch.no_grad():
        hidden = tower.eval()(features).last_hidden_state
    # GLM-ASR's conv stem halves the 100 Hz mel frames: [1, ceil(T_mel / 2), hidden].
    assert hidden.shape == (1, -(-features.shape[-1] // 2), tower.config.hidden_size)
    assert torch.isfinite(hidden).all()


@pytest.mark.parametrize("name", ASSET_SETS)
def test_decoder_loads_with_room_for_the_audio_token(name: str) -> None:
    path = resolve_asset(f"asset://{name}/decoder")
    model, info = Qwen3ForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size % 64 == 0
    assert model.config.vocab_size > len(tokenizer)  # the trainer adds <audio> without resizing
    assert model.config.tie_word_embeddings
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": INSTRUCTION}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], model.config.vocab_size)


@pytest.mark.parametrize("name", ASSET_SETS)
def test_corpus_streams_and_decodes(name: str) -> None:
    train_rows, eval_rows, max_mb = CORPUS_SIZES[name]
    train_files, eval_files = _shards(name, "train"), _shards(name, "eval")
    total_mb = sum(os.path.getsize(f) for f in train_files + eval_files) / 1e6
    assert total_mb < max_mb
    texts: dict[str, list[str]] = {}
    for split, files, rows in (("train", train_files, train_rows), ("eval", eval_files, eval_rows)):
        stream = load_dataset("parquet", data_files=files, split="train", streaming=True)
        texts[split] = []
        for i, row in enumerate(stream):
            assert set(row) == {"audio", "text"}
            texts[split].append(row["text"])
            if i < 3:  # decoding every clip is the pipeline's job; a few show the format
                samples, rate = sf.read(io.BytesIO(row["audio"]["bytes"]), dtype="float32")
                assert rate == 16_000 and samples.ndim == 1
                assert 0.3 < len(samples) / rate < 10
                assert np.sqrt(np.mean(samples**2)) > 1e-3
        assert len(texts[split]) == rows
    assert not set(texts["eval"]) & set(texts["train"])


def test_tiny_tokenizer_and_models_rebuild_identically(tmp_path: Path) -> None:
    shipped = ASSETS_DIR / "tiny"
    assert [*tiny_sentences()[0], *tiny_sentences()[1]] == [
        t for f in (*_shards("tiny", "train"), *_shards("tiny", "eval")) for t in corpus.read_shard(Path(f))[1]
    ]
    build_tiny(out_dir=tmp_path, with_corpus=False)
    assert (tmp_path / "decoder/tokenizer.json").read_text() == (shipped / "decoder/tokenizer.json").read_text()
    for sub in ("encoder", "decoder"):
        rebuilt, original = (
            load_file(tmp_path / sub / "model.safetensors"),
            load_file(shipped / sub / "model.safetensors"),
        )
        assert rebuilt.keys() == original.keys()
        assert all(torch.equal(rebuilt[k], original[k]) for k in original)


def test_mini_corpus_and_tokenizer_rebuild_from_the_seed() -> None:
    train_texts, eval_texts = mini_sentences()
    shards = (*_shards("mini", "train"), *_shards("mini", "eval"))
    shipped_texts = [t for f in shards for t in pq.read_table(f, columns=["text"])["text"].to_pylist()]
    assert [*train_texts, *eval_texts] == shipped_texts
    tokenizer = train_tokenizer(texts=[*train_texts, INSTRUCTION], vocab_size=MINI_VOCAB)
    shipped = ASSETS_DIR / "mini" / "decoder" / "tokenizer.json"
    assert tokenizer.backend_tokenizer.to_str() == Tokenizer.from_file(str(shipped)).to_str()


def test_tiny_corpus_audio_rebuilds_from_the_seed() -> None:
    require_tools("espeak-ng", hint="apt-get install espeak-ng")
    _, eval_texts = tiny_sentences()
    shipped_clips, _ = corpus.read_shard(Path(_shards("tiny", "eval")[0]))
    plans = corpus.plan(texts=eval_texts, seed=TINY_SEED + corpus.SPLIT_SEED_OFFSET["eval"])[:3]
    rebuilt = corpus.synthesize(plans, codec="VORBIS", compression_level=1.0)
    for clip, original in zip(rebuilt, shipped_clips, strict=False):
        samples, _ = sf.read(io.BytesIO(clip), dtype="float32")
        assert samples.shape == original.shape
        np.testing.assert_allclose(samples, original, atol=1e-4)


def test_align_stage_trains_the_saved_tower_through_the_trainers_model(tmp_path: Path) -> None:
    from tools.miniatures.align_encoder import align_encoder
    from tools.miniatures.mini import read_split
    from tools.miniatures.models import load_tower

    encoder_dir = tmp_path / "encoder"
    shutil.copytree(ASSETS_DIR / "tiny" / "encoder", encoder_dir)
    before = load_tower(encoder_dir).state_dict()
    clips, texts = read_split(ASSETS_DIR / "tiny" / "data", "train")
    lines: list[str] = []
    model = align_encoder(
        encoder_dir=encoder_dir,
        decoder_dir=ASSETS_DIR / "mini" / "decoder",  # pretrained: a random one gives the tower nothing to learn
        clips=clips[:32],
        texts=texts[:32],
        steps=100,
        batch_size=8,
        learning_rate=3e-3,
        seed=0,
        log=lines.append,
    )
    losses = [float(line.split("| loss ")[1].split()[0]) for line in lines]
    assert len(losses) == 3 and losses[-1] < 0.7 * losses[0], lines  # steps 1, 50, 100
    after = load_tower(encoder_dir).state_dict()
    assert after.keys() == before.keys()
    # Every tower tensor trained by its gradient and saved: measured min 0.018 per tensor; with the encoder run
    # under no_grad (as the trainer runs it) at most 3e-5, from float16 rounding.
    moved = [(after[k] - before[k]).abs().max().item() for k in before]
    assert min(moved) > 5e-3, moved
    tower = model.encoder.tower.state_dict()
    assert all(torch.equal(after[k], tower[k].half().float()) for k in tower)  # saved as float16
    for name in ("config.json", "preprocessor_config.json"):  # only the tensors were rewritten
        assert (encoder_dir / name).read_text() == (ASSETS_DIR / "tiny" / "encoder" / name).read_text()
    shipped = Qwen3ForCausalLM.from_pretrained(ASSETS_DIR / "mini" / "decoder", dtype=torch.float32).state_dict()
    decoder = model.decoder.state_dict()
    assert all(torch.equal(decoder[k], shipped[k]) for k in shipped)  # the decoder stayed frozen
