from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from tiny_audio.compile import compiled_graphs
from tiny_audio.experiments import load_config
from tiny_audio.model import asr as asr_module
from tiny_audio.model.asr import IGNORE, ASRModel
from tiny_audio.model.loading import build_model, parameter_report

TEXTS = ["the quick brown fox", "a tiny model learns to listen"]


@pytest.fixture(scope="module")
def model(tiny_model_dirs: tuple[Path, Path]) -> ASRModel:
    encoder, decoder = tiny_model_dirs
    cfg = load_config("tiny", [f"model.encoder_id={encoder}", f"model.decoder_id={decoder}", "projector.hidden_dim=32"])
    return build_model(cfg, device=torch.device("cpu"))


def audio_batch(seconds: tuple[float, ...] = (1.0, 0.6), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([int(s * 16000) for s in seconds])
    audio = torch.zeros(len(seconds), int(lengths.max()))
    for i, n in enumerate(lengths.tolist()):
        audio[i, :n] = 0.1 * torch.randn(n, generator=g)
    return audio, lengths


def test_only_the_projector_trains(model: ASRModel) -> None:
    report = {part: (trainable, frozen) for part, trainable, frozen in parameter_report(model)}
    assert report["encoder"][0] == 0 and report["decoder"][0] == 0
    assert report["projector"][0] > 0 and report["projector"][1] == 0
    audio, lengths = audio_batch()
    model.zero_grad(set_to_none=True)
    model(audio, lengths, TEXTS).loss_sum.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == name.startswith("projector."), name
    assert all(param.grad.abs().sum() > 0 for param in model.projector.parameters())
    model.zero_grad(set_to_none=True)


def test_labels_cover_only_the_transcript_and_end_of_turn(model: ASRModel) -> None:
    tok = model.prompt.tokenizer
    expected = [len(tok(t, add_special_tokens=False).input_ids) + 1 for t in TEXTS]
    audio, lengths = audio_batch()
    out = model(audio, lengths, TEXTS)
    assert out.num_tokens == sum(expected)
    assert model.prompt.labels(TEXTS[0])[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_loss_equals_full_logits_reference_with_prompt_masked(model: ASRModel, monkeypatch) -> None:
    audio, lengths = audio_batch()
    with torch.no_grad():
        fast = model(audio, lengths, TEXTS)
        # Reference: full logits at every position, standard shifted cross-entropy, -100 outside the transcript.
        embeddings, num_audio, _ = model.encode(audio, lengths)
        total = 0.0
        for i, text in enumerate(TEXTS):
            prompt = model.prompt.prompt(int(num_audio[i]))
            labels = model.prompt.labels(text)
            ids = torch.tensor([prompt + labels])
            target = torch.tensor([[IGNORE] * len(prompt) + labels])
            embeds = model.splice(ids, embeddings[i : i + 1], num_audio[i : i + 1])
            logits = model.decoder(inputs_embeds=embeds).logits
            total += torch.nn.functional.cross_entropy(
                logits[0, :-1], target[0, 1:], ignore_index=IGNORE, reduction="sum"
            ).item()
    assert fast.loss_sum.item() == pytest.approx(total, rel=1e-4)
    monkeypatch.setattr(asr_module, "LOSS_CHUNK", 3)  # many chunks: same sum
    with torch.no_grad():
        chunked = model(audio, lengths, TEXTS)
    assert chunked.loss_sum.item() == pytest.approx(total, rel=1e-4)


def test_projector_gradient_equals_full_logits_reference(model: ASRModel, monkeypatch) -> None:
    # The chunked loss computes d loss / d hidden itself: the projector's gradient must be the one autograd gives
    # through plain full-vocabulary logits at every position.
    monkeypatch.setattr(asr_module, "LOSS_CHUNK", 5)  # several chunks, the last one partial
    audio, lengths = audio_batch((1.0, 0.45))
    params = list(model.projector.parameters())

    out = model(audio, lengths, TEXTS)
    fast = torch.autograd.grad(out.loss_sum, params)

    features, frame_lengths = model.features(audio, lengths)
    hidden, enc_lengths = model.encode_features(features, frame_lengths)
    embeddings, num_audio, _ = model.project(hidden, enc_lengths)
    inputs = model.decoder_inputs(embeddings, num_audio, TEXTS)
    logits = model.decoder(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
    reference = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), inputs.labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )
    slow = torch.autograd.grad(reference, params)
    assert out.loss_sum.item() == pytest.approx(reference.item(), rel=1e-5)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_linear_cross_entropy_matches_autograd_in_chunks() -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=g, requires_grad=True)
    weight, bias = torch.randn(50, 16, generator=g), torch.randn(50, generator=g)
    targets = torch.randint(0, 50, (7,), generator=g)
    loss = asr_module.LinearCrossEntropy.apply(hidden, weight, bias, targets, 3)
    (grad,) = torch.autograd.grad(2.5 * loss, hidden)
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, targets, reduction="sum")
    (expected,) = torch.autograd.grad(2.5 * reference, hidden)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(grad, expected)


def test_batch_padding_does_not_change_the_loss(model: ASRModel) -> None:
    audio, lengths = audio_batch((1.0, 0.45))
    with torch.no_grad():
        together = model(audio, lengths, TEXTS).loss_sum.item()
        alone = sum(
            model(audio[i : i + 1, : lengths[i]], lengths[i : i + 1], TEXTS[i : i + 1]).loss_sum.item()
            for i in range(2)
        )
    assert together == pytest.approx(alone, rel=1e-4)


def assert_training_prompt_is_the_generation_prompt(model: ASRModel) -> str:
    """The decoder's input up to the answer is the same in training and generation; returns the prompt's text."""
    seen: list[torch.Tensor] = []
    hook = model.decoder.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("inputs_embeds")), with_kwargs=True
    )
    audio, lengths = audio_batch((0.8,))
    try:
        with torch.no_grad():
            model(audio, lengths, TEXTS[:1])
            model.generate(audio, lengths, max_new_tokens=2)
    finally:
        hook.remove()
    train_embeds, generate_embeds = seen[0], seen[1]  # generation's first call is the prompt, then token ids
    assert seen[2] is None
    prompt_len = generate_embeds.shape[1]
    torch.testing.assert_close(train_embeds[:, :prompt_len], generate_embeds)
    return model.prompt.tokenizer.decode(model.prompt.prompt(2))


def test_training_prompt_is_the_generation_prompt(model: ASRModel) -> None:
    text = assert_training_prompt_is_the_generation_prompt(model)
    # a template without a thinking switch (the miniatures') opens the answer right after the assistant marker
    assert text.endswith("<|im_start|>assistant\n")
    assert "<think>" not in text and "Transcribe the audio. <audio><audio>" in text


def test_a_qwen3_template_gets_the_empty_think_block_in_training_and_generation(
    qwen3_like_model_dirs: tuple[Path, Path],
) -> None:
    encoder, decoder = qwen3_like_model_dirs
    cfg = load_config("tiny", [f"model.encoder_id={encoder}", f"model.decoder_id={decoder}", "projector.hidden_dim=32"])
    qwen3 = build_model(cfg, device=torch.device("cpu"))
    text = assert_training_prompt_is_the_generation_prompt(qwen3)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert qwen3.prompt.render().count("<audio>") == 1
    # the answer's labels follow the think block: the transcript, then the end of the turn
    tok = qwen3.prompt.tokenizer
    assert qwen3.prompt.labels("a tiny model") == [
        *tok("a tiny model", add_special_tokens=False).input_ids,
        tok.convert_tokens_to_ids("<|im_end|>"),
    ]


def test_log_mel_matches_the_whisper_feature_extractor() -> None:
    extractor = WhisperFeatureExtractor(feature_size=128)
    from tiny_audio.model.features import LogMel

    rng = np.random.default_rng(0)
    clip = (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32)
    # Whisper pads every clip with zeros to 30 s; the first 2 s of its features are the clip's.
    reference = extractor(clip, sampling_rate=16000, return_tensors="np").input_features[0, :, :200]
    ours, frames = LogMel(extractor=extractor)(torch.from_numpy(clip)[None], torch.tensor([clip.size]))
    assert int(frames[0]) == reference.shape[-1] == 200
    np.testing.assert_allclose(ours[0, :, :200].numpy(), reference, atol=2e-4)


def test_the_model_s_features_always_split_into_whole_projector_groups(model: ASRModel) -> None:
    """Frames are padded to 2 x the frame stack, so no batch length leaves a partial group (a compiled graph
    would otherwise be built twice); the padded frames are zero and the clip's own frames are unchanged."""
    audio, lengths = audio_batch((1.0, 0.52))
    even = type(model.log_mel)(extractor=model.feature_extractor)
    for n in range(90, 100):  # clips of 90 to 99 frames: every remainder
        samples = n * model.log_mel.hop_length
        features, _ = model.log_mel(audio[:, :samples], torch.clamp(lengths, max=samples))
        plain, _ = even(audio[:, :samples], torch.clamp(lengths, max=samples))
        assert features.shape[-1] % (2 * model.stack) == 0 and features.shape[-1] - plain.shape[-1] < 2 * model.stack
        torch.testing.assert_close(features[..., : plain.shape[-1]], plain)
        assert not features[..., plain.shape[-1] :].any()


def test_encoder_output_of_a_padded_batch_equals_the_clip_alone(model: ASRModel) -> None:
    audio, lengths = audio_batch((1.0, 0.52))
    with torch.no_grad():
        features, frames = model.log_mel(audio, lengths)
        hidden, enc_lengths = model.encoder(features, frames)
        f1, fr1 = model.log_mel(audio[1:, : lengths[1]], lengths[1:])
        alone, _ = model.encoder(f1, fr1)
    n = int(enc_lengths[1])
    torch.testing.assert_close(hidden[1, :n], alone[0, :n], rtol=1e-4, atol=1e-4)


def test_window_padding_feeds_the_tower_exactly_as_glm_asr_s_processor(tiny_model_dirs: tuple[Path, Path]) -> None:
    from transformers import GlmAsrProcessor

    encoder, decoder = tiny_model_dirs
    overrides = [f"model.encoder_id={encoder}", f"model.decoder_id={decoder}", "model.encoder_padding=window"]
    windowed = build_model(load_config("tiny", [*overrides, "projector.hidden_dim=32"]), device=torch.device("cpu"))
    audio, lengths = audio_batch((1.0, 0.52))
    with torch.no_grad():
        features, frames = windowed.features(audio, lengths)
        hidden, _ = windowed.encode_features(features, frames)
        _, num_audio, _ = windowed.project(*windowed.encode_features(features, frames))
    assert features.shape[-1] == 3000 and hidden.shape[1] == 1500  # 30 s for every clip
    extractor = windowed.feature_extractor
    for i in range(2):
        clip = audio[i, : lengths[i]].numpy()
        # the processor's path: Whisper features padded to 30 s, the tower with no mask at all
        ref = extractor(clip, sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
        with torch.no_grad():
            expected = windowed.encoder.tower(ref.input_features).last_hidden_state[0]
        torch.testing.assert_close(hidden[i], expected, rtol=1e-3, atol=1e-3)
        tokens = GlmAsrProcessor._get_audio_token_length(None, ref.attention_mask.sum(-1))
        assert int(num_audio[i]) == int(tokens[0])


def test_generate_returns_one_string_per_clip(model: ASRModel) -> None:
    audio, lengths = audio_batch((0.7, 0.4, 0.9))
    out = model.generate(audio, lengths, max_new_tokens=3)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)


@pytest.mark.slow
def test_compiled_parts_give_the_eager_loss_and_gradients(tiny_model_dirs: tuple[Path, Path]) -> None:
    encoder, decoder = tiny_model_dirs
    cfg = load_config("tiny", [f"model.encoder_id={encoder}", f"model.decoder_id={decoder}", "projector.hidden_dim=32"])
    model = build_model(cfg, device=torch.device("cpu"))
    keys = set(model.projector.state_dict())
    results, graphs = [], []
    for compiled in (False, True):
        if compiled:
            model.compile_parts(dynamic=True)
        for seconds in ((1.0, 0.6), (0.7, 0.5, 0.9)):  # two batch shapes: one dynamic graph serves both
            audio, lengths = audio_batch(seconds)
            out = model(audio, lengths, [*TEXTS, "one more"][: len(seconds)])
            grads = torch.autograd.grad(out.loss_sum, list(model.projector.parameters()))
            results.append((out.loss_sum.detach(), grads))
            graphs.append(compiled_graphs())
    assert graphs[0] == graphs[1] < graphs[2] == graphs[3]  # compiled for real, and not again for the new shape
    for (eager_loss, eager_grads), (loss, grads) in zip(results[:2], results[2:], strict=True):
        torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-4)
        for a, b in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert set(model.projector.state_dict()) == keys  # checkpoints keep their keys


def test_compare_padding_prints_the_similarity_of_both_ways() -> None:
    from tiny_audio.diagnostics import compare_padding

    cfg = load_config("tiny", ["data.num_workers=1"])
    result = compare_padding(cfg, samples=5, token=None, device=torch.device("cpu"))
    assert len(result.similarities) == len(result.seconds) == 5
    assert all(-1.0 <= c <= 1.0 + 1e-6 for c in result.similarities)
    # the random miniature encoder is not indifferent to 30 s of unmasked padding
    assert min(result.similarities) < 0.999
    assert result.window_s > 0 and result.batch_s > 0
    assert "5 clips: cosine mean" in result.render()
