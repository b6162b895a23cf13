import json

import pytest
import torch
from transformers import GlmAsrEncoder, GlmAsrEncoderConfig, Qwen3Config, Qwen3ForCausalLM

from tiny_audio.config import ProjectorConfig
from tiny_audio.model.projectors import build_projector
from tools.bench import flops, projectors, step, timing, workload

TOY = [
    *["--enc-dim", "32", "--enc-layers", "1", "--enc-heads", "2", "--proj-hidden", "16"],
    *["--dec-dim", "32", "--dec-layers", "1", "--dec-heads", "2", "--vocab", "1000"],
    *["--batch-size", "2", "--steps", "1", "--bucket-batches", "2"],
    *["--projector-widths", "bench", "--projector-steps", "1"],  # the projectors alone at the toy widths
    *["--compile-projectors", "none"],  # compiling costs minutes on a CPU: its own (slow) test below
]


def test_bench_runs_at_a_toy_size_and_prints_json(capsys, tmp_path) -> None:
    out_file = tmp_path / "bench.json"
    step.main([*TOY, "--json-out", str(out_file)])
    text = capsys.readouterr().out
    printed = json.loads(text.strip().splitlines()[-1])
    assert printed == json.loads(out_file.read_text())
    fast, naive = printed["fast"], printed["naive"]
    for figures in (fast, naive):
        assert figures["samples"] == 2 and figures["samples_per_s"] > 0 and figures["peak_memory_mb"] > 0
        assert all(figures[f"{p}_s"] >= 0 for p in timing.PHASES)
        assert figures["step_s"] == pytest.approx(sum(figures[f"{p}_s"] for p in timing.PHASES))
    # The same clips on both paths; only the naive one pays for padding to 30 s.
    assert fast["mean_clip_s"] == pytest.approx(naive["mean_clip_s"])
    assert 0 <= fast["padding_fraction"] < naive["padding_fraction"] < 1
    assert naive["gflops_per_sample"] > fast["gflops_per_sample"]
    assert fast["full_over_irreducible"] > 0
    assert set(printed["projection"]) == {"qwen3-0.6b/fast", "qwen3-0.6b/naive", "qwen3-1.7b/fast", "qwen3-1.7b/naive"}
    # The three projectors side by side, each at the course's size between the given widths, on one batch.
    alone = printed["projectors"]
    assert set(alone) == {"mlp", "mosa", "moe"}
    for kind, row in alone.items():
        built = build_projector(ProjectorConfig(type=kind), in_dim=32, out_dim=32, target_rms=0.03)
        assert row["parameters"] == sum(p.numel() for p in built.parameters())
        assert (row["in_dim"], row["out_dim"]) == (32, 32) and row["step_ms"] > 0 and "peak_memory_mb" in row
    assert len({row["tokens"] for row in alone.values()}) == 1 and alone["mlp"]["tokens"] > 0
    assert "projectors alone (forward + backward, 2 clips" in text


def test_the_projectors_alone_section_uses_the_courses_real_widths() -> None:
    # GLM-ASR-Nano's 1280-wide frames into Qwen3-0.6B (1024) for mlp, into Qwen3-1.7B (2048) for mosa and moe.
    assert projectors.PROJECTOR_WIDTHS == {"mlp": (1280, 1024), "mosa": (1280, 2048), "moe": (1280, 2048)}


def test_layer_weight_counts_match_the_real_architectures() -> None:
    # The FLOP model's per-layer weights, checked against the transformers modules at the published sizes (meta).
    real = workload.REAL_06B
    with torch.device("meta"):
        encoder = GlmAsrEncoder(GlmAsrEncoderConfig())
        decoder = Qwen3ForCausalLM(
            Qwen3Config(
                hidden_size=real.dec_dim,
                intermediate_size=real.dec_ffn,
                num_hidden_layers=1,
                num_attention_heads=real.dec_heads,
                num_key_value_heads=real.dec_kv_heads,
                head_dim=real.dec_head_dim,
                vocab_size=real.vocab,
            )
        )
    assert encoder.config.hidden_size == real.enc_dim and len(encoder.layers) == real.enc_layers
    matrices = [p.numel() for p in encoder.layers[0].parameters() if p.dim() == 2]
    assert sum(matrices) == flops.encoder_layer_weights(real)
    matrices = [p.numel() for p in decoder.model.layers[0].parameters() if p.dim() == 2]
    assert sum(matrices) == flops.decoder_layer_weights(real)


def test_clip_lengths_follow_the_realistic_distribution() -> None:
    import numpy as np

    seconds = workload.sample_seconds(5000, rng=np.random.default_rng(0))
    assert seconds.min() >= 2.0 and seconds.max() <= 30.0
    assert 9.0 < seconds.mean() < 11.0


@pytest.mark.slow
def test_the_compile_section_times_the_trainers_step_both_ways(capsys) -> None:
    toy = [a if a != "none" else "mlp" for a in TOY]  # the compile section, for mlp alone
    printed = json.loads(step.main([*toy, "--projector-widths", "none"]) and capsys.readouterr().out.splitlines()[-1])
    row = printed["compile"]["mlp"]
    assert row["eager_step_s"] > 0 and row["compiled_step_s"] > 0 and row["speedup"] > 0
    assert row["graphs"] >= 1  # compiled for real
    assert row["compiled_first_step_s"] > row["compiled_step_s"]  # the first compiled step paid for compiling
