import pytest
import torch

from tiny_audio.config import ProjectorConfig
from tiny_audio.model.projectors import PROJECTORS, build_projector
from tiny_audio.model.projectors.common import stack_frames
from tiny_audio.model.projectors.moe import MoEProjector


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_mlp_has_the_course_size_at_real_widths() -> None:
    # GLM-ASR-Nano tower (1280) -> Qwen3-0.6B (1024), stack 4, hidden 2048: ~12.6M, built on meta (no memory).
    with torch.device("meta"):
        projector = build_projector(ProjectorConfig(type="mlp"), in_dim=1280, out_dim=1024, target_rms=0.03)
    assert 12.5e6 < count(projector) < 12.7e6


@pytest.mark.parametrize("kind", sorted(PROJECTORS))
def test_contract_shapes(kind: str) -> None:
    cfg = ProjectorConfig(type=kind, hidden_dim=32, num_experts=4, top_k=2)
    projector = build_projector(cfg, in_dim=8, out_dim=16, target_rms=0.05)
    features = torch.randn(3, 23, 8)  # 23 frames: the trailing partial group of 4 is dropped
    out, aux = projector(features, torch.ones(3, 5, dtype=torch.bool))
    assert out.shape == (3, 5, 16)
    assert aux.shape == ()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", sorted(PROJECTORS))
def test_output_starts_at_the_decoder_embedding_scale(kind: str) -> None:
    projector = build_projector(ProjectorConfig(type=kind, hidden_dim=32), in_dim=8, out_dim=64, target_rms=0.7)
    out, _ = projector(torch.randn(2, 40, 8))
    assert out.pow(2).mean().sqrt().item() == pytest.approx(0.7, rel=0.05)


def test_stack_frames_puts_consecutive_frames_side_by_side() -> None:
    x = torch.arange(2 * 9 * 3, dtype=torch.float32).reshape(2, 9, 3)
    y = stack_frames(x, 4)
    assert y.shape == (2, 2, 12)
    assert torch.equal(y[1, 1], torch.cat([x[1, 4], x[1, 5], x[1, 6], x[1, 7]]))


def test_moe_dispatch_equals_a_per_token_reference() -> None:
    torch.manual_seed(0)
    moe = MoEProjector(in_dim=4, out_dim=8, stack=2, hidden_dim=16, num_experts=4, top_k=2, target_rms=None)
    features = torch.randn(2, 10, 4)
    out, _ = moe(features)
    flat = stack_frames(features, 2).reshape(-1, 8)
    probs = moe.router(flat).float().softmax(-1)
    ref = []
    for token, p in zip(flat, probs, strict=True):  # the obvious loop over tokens
        weights, experts = p.topk(2)
        weights = weights / weights.sum()
        routed = sum(w * moe.experts[int(e)](token) for w, e in zip(weights, experts, strict=True))
        ref.append(moe.shared(token) + routed)
    torch.testing.assert_close(out.reshape(-1, 8), torch.stack(ref), rtol=1e-5, atol=1e-5)


def test_moe_balance_loss_is_one_when_perfectly_balanced_and_larger_when_collapsed() -> None:
    moe = MoEProjector(in_dim=4, out_dim=8, stack=1, hidden_dim=8, num_experts=4, top_k=1)
    uniform = torch.full((8, 4), 0.25)
    balanced = torch.arange(8).remainder(4)[:, None]
    assert moe.balance_loss(uniform, balanced).item() == pytest.approx(1.0)
    collapsed_probs = torch.tensor([[1.0, 0, 0, 0]]).repeat(8, 1)
    assert moe.balance_loss(collapsed_probs, torch.zeros(8, 1, dtype=torch.long)).item() == pytest.approx(4.0)


def test_moe_aux_loss_reaches_the_router() -> None:
    moe = MoEProjector(in_dim=4, out_dim=8, stack=2, hidden_dim=16, num_experts=4, top_k=2)
    _, aux = moe(torch.randn(2, 12, 4))
    aux.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
