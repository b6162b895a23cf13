import inspect
import math
import re

import pytest
import torch
from torch import nn

from tiny_audio.config import PROJECTOR_SETTINGS, Config, ProjectorConfig
from tiny_audio.errors import ConfigError
from tiny_audio.experiments import load_config
from tiny_audio.model.projectors import PROJECTORS, build_projector
from tiny_audio.model.projectors.common import stack_frames
from tiny_audio.model.projectors.moe import MoEProjector
from tiny_audio.model.projectors.mosa import MOSAProjector


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- the course's projectors at real widths ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "out_dim", "millions"),
    [
        ("mlp", 1024, 12.6),  # GLM-ASR-Nano tower (1280) -> Qwen3-0.6B, stack 4, hidden 2048
        ("mosa", 2048, 118.1),  # -> Qwen3-1.7B: 4 adapters 5120 -> 4096 -> 2048, router 1280 -> 512 -> 4
        ("moe", 2048, 183.6),  # -> Qwen3-1.7B: shared + 4 routed experts 5120 -> 5120 -> 2048, conv, norm, router
    ],
)
def test_each_projector_has_the_course_size_at_real_widths(kind: str, out_dim: int, millions: float) -> None:
    with torch.device("meta"):  # no memory
        default = build_projector(ProjectorConfig(type=kind), in_dim=1280, out_dim=out_dim, target_rms=0.03)
        shipped = build_projector(load_config(kind).projector, in_dim=1280, out_dim=out_dim, target_rms=0.03)
    assert count(default) == pytest.approx(millions * 1e6, abs=0.2e6)
    assert count(shipped) == count(default)  # the experiment files state the course's values


@pytest.mark.parametrize("kind", sorted(PROJECTORS))
def test_the_registry_gives_each_class_exactly_the_settings_its_type_reads(kind: str) -> None:
    keywords = set(inspect.signature(PROJECTORS[kind]).parameters) - {"in_dim", "out_dim", "target_rms"}
    assert keywords == set(PROJECTOR_SETTINGS[kind])


@pytest.mark.parametrize(
    ("experiment", "override", "message"),
    [
        ("tiny", "projector.top_k=2", "projector.top_k: not read by the mlp projector (only by moe)"),
        ("tiny", "projector.num_experts=4", "projector.num_experts: not read by the mlp projector (only by mosa and"),
        ("moe", "projector.router_hidden_dim=256", "projector.router_hidden_dim: not read by the moe projector"),
        ("mosa", "projector.aux_loss_coef=0.1", "projector.aux_loss_coef: not read by the mosa projector"),
        ("mosa", "projector.type=moe", "projector.router_hidden_dim: not read by the moe projector"),
        ("moe", "projector.top_k=5", "projector.top_k: must be <= projector.num_experts (4)"),
    ],
)
def test_a_setting_the_projector_does_not_read_is_refused(experiment: str, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(experiment, [override])


@pytest.mark.parametrize("experiment", ["mlp", "mosa", "moe", "tiny"])
def test_a_saved_config_holds_its_types_settings_only_and_loads_again(experiment: str) -> None:
    cfg = load_config(experiment)
    saved = cfg.to_dict()  # what a checkpoint stores
    assert set(saved["projector"]) == {"type", "match_embedding_rms", *PROJECTOR_SETTINGS[cfg.projector.type]}
    assert Config.model_validate(saved) == cfg


def test_settings_of_the_chosen_type_are_accepted() -> None:
    cfg = load_config("tiny", ["projector.type=moe", "projector.top_k=1", "projector.num_experts=8"])
    assert (cfg.projector.top_k, cfg.projector.num_experts, cfg.projector.hidden_dim) == (1, 8, 256)


# -- the contract ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(PROJECTORS))
def test_contract_shapes(kind: str) -> None:
    projector = build_projector(ProjectorConfig(type=kind, hidden_dim=32), in_dim=8, out_dim=16, target_rms=0.05)
    features = torch.randn(3, 23, 8)  # 23 frames: the trailing partial group of 4 is dropped
    out, aux = projector(features, torch.ones(3, 5, dtype=torch.bool))
    assert out.shape == (3, 5, 16)
    assert aux.shape == ()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", sorted(PROJECTORS))
def test_a_clip_projects_the_same_alone_and_padded_in_a_batch(kind: str) -> None:
    torch.manual_seed(0)
    projector = build_projector(ProjectorConfig(type=kind, hidden_dim=32), in_dim=8, out_dim=16, target_rms=0.05)
    clip = torch.randn(1, 22, 8)  # 5 tokens (2 frames dropped)
    batch = torch.cat([torch.cat([clip, 9 * torch.randn(1, 18, 8)], dim=1), torch.randn(1, 40, 8)])  # junk after
    mask = torch.arange(10)[None, :] < torch.tensor([[5], [10]])
    alone, aux_alone = projector(clip, torch.ones(1, 5, dtype=torch.bool))
    padded, _ = projector(batch, mask)
    torch.testing.assert_close(padded[0, :5], alone[0])
    # the aux losses count real tokens only: the same clip twice, padded with junk, balances as the clip alone
    _, aux_twice = projector(torch.cat([batch[:1], torch.cat([clip, -batch[:1, 22:]], dim=1)]), mask[[0, 0]])
    torch.testing.assert_close(aux_twice, aux_alone)


@pytest.mark.parametrize("kind", sorted(PROJECTORS))
def test_output_starts_at_the_decoder_embedding_scale_when_asked(kind: str) -> None:
    cfg = ProjectorConfig(type=kind, hidden_dim=32, match_embedding_rms=True)
    out, _ = build_projector(cfg, in_dim=8, out_dim=64, target_rms=0.7)(torch.randn(2, 40, 8))
    assert out.pow(2).mean().sqrt().item() == pytest.approx(0.7, rel=0.05)
    plain = build_projector(ProjectorConfig(type=kind, hidden_dim=32), in_dim=8, out_dim=64, target_rms=0.7)
    assert not any(isinstance(m, nn.RMSNorm) for m in plain.scale.modules())  # off by default, as in the course


def test_stack_frames_puts_consecutive_frames_side_by_side() -> None:
    x = torch.arange(2 * 9 * 3, dtype=torch.float32).reshape(2, 9, 3)
    y = stack_frames(x, 4)
    assert y.shape == (2, 2, 12)
    assert torch.equal(y[1, 1], torch.cat([x[1, 4], x[1, 5], x[1, 6], x[1, 7]]))


# -- mosa ----------------------------------------------------------------------------------------------------------
def test_mosa_routes_on_each_tokens_frames_averaged_and_mixes_every_adapter() -> None:
    torch.manual_seed(0)
    mosa = MOSAProjector(in_dim=6, out_dim=5, stack=4, hidden_dim=16, num_experts=3, router_hidden_dim=8)
    seen: list[torch.Tensor] = []
    mosa.router.register_forward_hook(lambda module, args, out: seen.append(out))
    features = torch.randn(2, 12, 6)  # 3 tokens of 4 frames
    shuffled = features.reshape(2, 3, 4, 6)[:, :, [2, 0, 3, 1]].reshape(2, 12, 6)  # frames reordered per token
    out, aux = mosa(features)
    out_shuffled, _ = mosa(shuffled)
    # The router reads the frames' mean: reordering frames within a token leaves its weights unchanged (a router
    # on the stacked frames would see another input), while the adapters, which see the order, change the output.
    torch.testing.assert_close(seen[0], seen[1])
    assert not torch.allclose(out, out_shuffled)
    # every adapter contributes, weighted by the softmax of the router's logits on the mean of the frames
    pooled = features.reshape(2, 3, 4, 6).mean(dim=2)
    router = mosa.router
    weights = router[2](torch.relu(router[0](pooled))).softmax(dim=-1)  # [B, T', E]
    stacked = features.reshape(2, 3, 24)
    expected = sum(weights[..., e, None] * mosa.experts[e](stacked) for e in range(3))
    torch.testing.assert_close(out, expected)
    assert (weights > 0).all() and aux.item() == 0


# -- moe ---------------------------------------------------------------------------------------------------------
def moe_reference(moe: MoEProjector, features: torch.Tensor) -> torch.Tensor:
    """The course's moe for one clip [T, C], written as the obvious loops over frames and tokens."""
    conv, stack = moe.temporal_conv, moe.stack
    frames = features[: features.shape[0] // stack * stack]
    padded = torch.cat([torch.zeros(1, frames.shape[1]), frames, torch.zeros(1, frames.shape[1])])
    mixed = [
        frames[t]
        + conv.weight[:, 0, 0] * padded[t]
        + conv.weight[:, 0, 1] * padded[t + 1]
        + conv.weight[:, 0, 2] * padded[t + 2]
        + conv.bias
        for t in range(frames.shape[0])
    ]  # each channel mixed with its own neighbours (depthwise), added back to the frame
    out = []
    for i in range(len(mixed) // stack):
        x = torch.cat(mixed[i * stack : (i + 1) * stack])
        x = x / torch.sqrt(x.square().mean() + 1e-8) * moe.norm.weight
        scores = torch.sigmoid(moe.router.weight @ x)
        top, experts = scores.topk(moe.top_k)
        weights = top / top.sum()
        out.append(moe.shared(x) + sum(w * moe.experts[int(e)](x) for w, e in zip(weights, experts, strict=True)))
    return torch.stack(out)


def test_moe_equals_a_per_token_reference_with_sigmoid_top2_renormalised_weights() -> None:
    torch.manual_seed(0)
    moe = MoEProjector(in_dim=4, out_dim=8, stack=2, hidden_dim=16, num_experts=4, top_k=2)
    with torch.no_grad():  # routed experts and router far from their near-zero start, so routing shows
        nn.init.normal_(moe.router.weight)
        for expert in moe.experts:
            nn.init.normal_(expert.fc2.weight)
        nn.init.normal_(moe.temporal_conv.weight)
    features = torch.randn(2, 11, 4)
    out, _ = moe(features)
    for clip, got in zip(features, out, strict=True):
        torch.testing.assert_close(got, moe_reference(moe, clip), rtol=1e-5, atol=1e-5)


def test_moe_balance_loss_is_the_courses_formula() -> None:
    moe = MoEProjector(in_dim=4, out_dim=8, stack=1, hidden_dim=8, num_experts=4, top_k=2)
    logits = torch.zeros(2, 4)
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5], [0.7, 0.3, 0.5, 0.5]])  # mean per expert 0.8, 0.2, 0.5, 0.5
    top_e = torch.tensor([[0, 2], [0, 3]])
    balance, z = moe.router_losses(logits, scores, top_e)
    # E * sum_e (p_e - mean p)^2 = 4 * (0.3^2 + 0.3^2 + 0 + 0)
    assert balance.item() == pytest.approx(4 * 0.18)
    assert z.item() == pytest.approx(math.log(4) ** 2)  # logsumexp of 4 zero logits, squared
    assert moe.expert_load.tolist() == [0.5, 0.0, 0.25, 0.25]  # share of the 4 routed slots
    metrics = moe.metrics()
    assert metrics["moe/expert_0_load"] == 0.5 and metrics["moe/balance_loss"] == pytest.approx(0.72)
    assert moe.router_losses(logits, torch.full((2, 4), 0.3), top_e)[0].item() == 0  # scored alike: no penalty


def test_moe_aux_loss_weights_the_two_losses_and_reaches_the_router() -> None:
    torch.manual_seed(0)
    moe = MoEProjector(in_dim=4, out_dim=8, stack=2, hidden_dim=16, num_experts=4, aux_loss_coef=0.5, z_loss_coef=0.1)
    _, aux = moe(torch.randn(2, 12, 4))
    balance, z = moe.last_losses
    assert aux.item() == pytest.approx(0.5 * balance.item() + 0.1 * z.item())
    aux.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_moe_initialisation_is_orthogonal_with_small_routed_outputs() -> None:
    moe = MoEProjector(in_dim=4, out_dim=8, stack=4, num_experts=3)  # expert hidden = 16 = stack x width
    eye = torch.eye(8)
    for expert in [moe.shared, *moe.experts]:
        weight = expert.fc1.weight  # [16, 16]
        torch.testing.assert_close(weight @ weight.T, torch.eye(16), atol=1e-5, rtol=0)
    out_layer = moe.shared.fc2.weight  # [8, 16]: orthonormal rows times the gain
    torch.testing.assert_close(out_layer @ out_layer.T, 0.25 * eye, atol=1e-5, rtol=0)
    for expert in moe.experts:
        torch.testing.assert_close(expert.fc2.weight @ expert.fc2.weight.T, 1e-4 * eye, atol=1e-7, rtol=0)
    assert moe.router.weight.std().item() < 0.05  # near-uniform scores at the start


def test_moe_gives_an_expert_no_token_chose_a_zero_gradient_not_none() -> None:
    # What DDP needs: every parameter gets a gradient in every step. 2 tokens, top-1 of 8 experts: 6 or more idle.
    torch.manual_seed(0)
    moe = MoEProjector(in_dim=4, out_dim=8, stack=2, hidden_dim=16, num_experts=8, top_k=1)
    out, aux = moe(torch.randn(1, 4, 4))
    (out.square().sum() + aux).backward()
    idle = [i for i, load in enumerate(moe.expert_load.tolist()) if load == 0]
    assert len(idle) >= 6
    for name, param in moe.named_parameters():
        assert param.grad is not None, name
    for i in idle:
        assert all(p.grad.abs().sum() == 0 for p in moe.experts[i].parameters())
