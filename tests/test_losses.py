"""Tests for the KV distillation losses: closed-form values, masking, centring, metrics."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses import (
    LOSS_NAMES,
    METRIC_KEYS,
    HybridKVLoss,
    MercatorKVLoss,
    MSEKVLoss,
    build_loss,
    layer_std,
    variance_floor_penalty,
)
from distill.lm_losses import answer_cross_entropy, next_token_ids, next_token_mask, topk_kl_divergence

REPO_ROOT = Path(__file__).resolve().parent.parent
DIM = 128


@pytest.fixture
def unit_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Two orthonormal float64 vectors in DIM dimensions."""
    generator = torch.Generator().manual_seed(1234)
    u = torch.randn(DIM, generator=generator, dtype=torch.float64)
    u = u / u.norm()
    w = torch.randn(DIM, generator=generator, dtype=torch.float64)
    w = w - (w @ u) * u
    return u, w / w.norm()


# Closed-form values: teacher = 100 x student along one direction.


def test_mse_scaled_copy(unit_pair):
    u, _ = unit_pair
    loss, _ = MSEKVLoss()(u, 100.0 * u)
    assert loss.item() == pytest.approx(76.5703125, abs=1e-9)


def test_mercator_scaled_copy_zero(unit_pair):
    u, _ = unit_pair
    loss, metrics = MercatorKVLoss(beta=0.0)(u, 100.0 * u)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert metrics["cos_sim"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(("beta", "expected"), [(0.01, 0.21208), (0.1, 2.1208)])
def test_mercator_magnitude_term(unit_pair, beta, expected):
    u, _ = unit_pair
    loss, metrics = MercatorKVLoss(beta=beta)(u, 100.0 * u)
    assert loss.item() == pytest.approx(expected, abs=5e-5)
    assert loss.item() == pytest.approx(beta * math.log(100.0) ** 2, rel=1e-9)
    assert metrics["mag_loss"] == pytest.approx(math.log(100.0) ** 2, rel=1e-9)


def test_magnitude_metrics(unit_pair):
    u, _ = unit_pair
    _, metrics = MercatorKVLoss()(u, 100.0 * u)
    assert metrics["s_magnitude"] == pytest.approx(1.0)
    assert metrics["t_magnitude"] == pytest.approx(100.0)
    assert metrics["mag_ratio"] == pytest.approx(0.01)


def test_orthogonal_vectors(unit_pair):
    u, w = unit_pair
    loss, metrics = MercatorKVLoss()(u, w)
    assert metrics["cos_sim"] == pytest.approx(0.0, abs=1e-12)
    assert loss.item() == pytest.approx(1.0, abs=1e-12)


def test_opposite_vectors(unit_pair):
    u, _ = unit_pair
    loss, metrics = MercatorKVLoss()(u, -3.0 * u)
    assert metrics["cos_sim"] == pytest.approx(-1.0, abs=1e-12)
    assert loss.item() == pytest.approx(2.0, abs=1e-12)


@pytest.mark.parametrize(
    ("degrees", "expected"),
    [(15, 0.96593), (30, 0.86603), (45, 0.70711), (60, 0.5), (90, 0.0), (180, -1.0)],
)
def test_rotation_gives_cosine(unit_pair, degrees, expected):
    u, w = unit_pair
    radians = math.radians(degrees)
    rotated = math.cos(radians) * u + math.sin(radians) * w
    _, metrics = MercatorKVLoss()(u, rotated)
    assert metrics["cos_sim"] == pytest.approx(expected, abs=5e-6)
    assert metrics["cos_sim"] == pytest.approx(math.cos(radians), abs=1e-12)


def test_metric_keys_all_losses(unit_pair):
    u, w = unit_pair
    for loss_fn in (MercatorKVLoss(), MercatorKVLoss(centred=True), MSEKVLoss(), HybridKVLoss()):
        _, metrics = loss_fn(u, w)
        assert tuple(metrics) == METRIC_KEYS
        assert all(isinstance(value, float) for value in metrics.values())


# Shapes and input checks.


def test_four_d_matches_flattened():
    generator = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, 16, generator=generator)
    t = torch.randn(2, 3, 5, 16, generator=generator)
    loss, _ = MercatorKVLoss()(s, t)
    flat_loss, _ = MercatorKVLoss()(s.reshape(-1, 16), t.reshape(-1, 16))
    assert loss.item() == pytest.approx(flat_loss.item(), abs=1e-6)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\(2, 8\).*\(2, 9\)"):
        MercatorKVLoss()(torch.randn(2, 8), torch.randn(2, 9))


def test_three_d_input_raises():
    with pytest.raises(ValueError, match="got shape"):
        MercatorKVLoss()(torch.randn(2, 3, 8), torch.randn(2, 3, 8))


def test_mask_shape_raises():
    with pytest.raises(ValueError, match="mask shape"):
        MercatorKVLoss()(torch.randn(2, 1, 4, 8), torch.randn(2, 1, 4, 8), torch.ones(2, 5, dtype=torch.bool))


def test_float_mask_raises():
    with pytest.raises(ValueError, match="bool"):
        MercatorKVLoss()(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), torch.ones(1, 4))


def test_all_padding_raises():
    with pytest.raises(ValueError, match="no real token"):
        MercatorKVLoss()(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), torch.zeros(1, 4, dtype=torch.bool))


def test_bfloat16_inputs_upcast():
    generator = torch.Generator().manual_seed(0)
    s = torch.randn(1, 2, 6, 64, generator=generator)
    t = torch.randn(1, 2, 6, 64, generator=generator)
    loss_bf16, _ = MercatorKVLoss()(s.bfloat16(), t.bfloat16())
    loss_fp32, _ = MercatorKVLoss()(s.bfloat16().float(), t.bfloat16().float())
    assert loss_bf16.dtype == torch.float32
    assert loss_bf16.item() == pytest.approx(loss_fp32.item(), abs=1e-6)


# Masking: padding never reaches the loss or the gradient.


def _ragged_pair(short: int = 3, long: int = 200, layers: int = 2, dim: int = 32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    s = torch.randn(2, layers, long, dim, generator=generator, dtype=torch.float64)
    t = torch.randn(2, layers, long, dim, generator=generator, dtype=torch.float64)
    mask = torch.ones(2, long, dtype=torch.bool)
    mask[0, short:] = False
    return s, t, mask


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_padded_batch_weights_tokens(beta):
    s, t, mask = _ragged_pair()
    loss_fn = MercatorKVLoss(beta=beta)
    batch_loss, _ = loss_fn(s, t, mask)
    short_loss, _ = loss_fn(s[:1, :, :3], t[:1, :, :3])
    long_loss, _ = loss_fn(s[1:], t[1:])
    expected = (3 * short_loss + 200 * long_loss) / 203
    assert batch_loss.item() == pytest.approx(expected.item(), abs=1e-12)


def test_mse_padded_batch_weights_tokens():
    s, t, mask = _ragged_pair()
    batch_loss, _ = MSEKVLoss()(s, t, mask)
    short_loss, _ = MSEKVLoss()(s[:1, :, :3], t[:1, :, :3])
    long_loss, _ = MSEKVLoss()(s[1:], t[1:])
    expected = (3 * short_loss + 200 * long_loss) / 203
    assert batch_loss.item() == pytest.approx(expected.item(), abs=1e-12)


def _loss_and_grad(loss_fn, s, t, mask):
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    loss, metrics = loss_fn(s, t, mask)
    loss.backward()
    return loss.detach(), metrics, s.grad, t.grad


@pytest.mark.parametrize("fill", [0.0, 1e6, math.nan, math.inf])
def test_centred_padding_changes_nothing(fill):
    generator = torch.Generator().manual_seed(3)
    s = torch.randn(2, 4, 10, 16, generator=generator, dtype=torch.float64)
    t = torch.randn(2, 4, 10, 16, generator=generator, dtype=torch.float64)
    loss_fn = MercatorKVLoss(beta=0.05, centred=True)
    loss, metrics, s_grad, t_grad = _loss_and_grad(loss_fn, s, t, None)

    padded_s = torch.full((2, 4, 17, 16), fill, dtype=torch.float64)
    padded_t = torch.full((2, 4, 17, 16), fill, dtype=torch.float64)
    padded_s[:, :, :10] = s
    padded_t[:, :, :10] = t
    mask = torch.zeros(2, 17, dtype=torch.bool)
    mask[:, :10] = True
    padded_loss, padded_metrics, padded_s_grad, padded_t_grad = _loss_and_grad(loss_fn, padded_s, padded_t, mask)

    assert padded_loss.item() == pytest.approx(loss.item(), abs=1e-12)
    assert padded_metrics == pytest.approx(metrics, abs=1e-12)
    assert torch.allclose(padded_s_grad[:, :, :10], s_grad, atol=1e-12)
    assert torch.allclose(padded_t_grad[:, :, :10], t_grad, atol=1e-12)
    assert torch.count_nonzero(padded_s_grad[:, :, 10:]) == 0
    assert torch.count_nonzero(padded_t_grad[:, :, 10:]) == 0


def test_all_losses_finite_with_nan_padding():
    s, t, mask = _ragged_pair(short=5, long=12)
    s[0, :, 5:] = math.nan
    t[0, :, 5:] = math.inf
    for name in LOSS_NAMES:
        loss, metrics, s_grad, t_grad = _loss_and_grad(build_loss(name, beta=0.01), s, t, mask)
        assert torch.isfinite(loss), name
        assert all(math.isfinite(value) for value in metrics.values()), name
        assert torch.isfinite(s_grad).all(), name
        assert torch.isfinite(t_grad).all(), name


# Centring.


def test_centred_removes_shared_offset():
    generator = torch.Generator().manual_seed(5)
    s = torch.randn(2, 3, 8, 32, generator=generator, dtype=torch.float64)
    offset = 50.0 * torch.randn(1, 3, 1, 32, generator=generator, dtype=torch.float64)
    t = 2.0 * s + offset
    loss, metrics = MercatorKVLoss(centred=True)(s, t)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    assert metrics["centred_cos"] == pytest.approx(1.0, abs=1e-10)
    assert metrics["cos_sim"] < 0.5


def test_constant_student_scores_zero_centred():
    generator = torch.Generator().manual_seed(6)
    t = torch.randn(1, 2, 16, 32, generator=generator, dtype=torch.float64)
    s = t.mean(dim=2, keepdim=True).expand_as(t).clone()
    _, raw_metrics = MercatorKVLoss()(s, t)
    loss, metrics = MercatorKVLoss(centred=True)(s, t)
    # Centring leaves rounding residue far below epsilon, so the cosine is only near 0.
    assert metrics["centred_cos"] == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    assert raw_metrics["cos_sim"] > 0.1


def test_centred_means_span_batch():
    # Each sample alone is centred differently from the two together.
    generator = torch.Generator().manual_seed(7)
    s = torch.randn(2, 1, 6, 16, generator=generator, dtype=torch.float64)
    t = torch.randn(2, 1, 6, 16, generator=generator, dtype=torch.float64)
    s_centred = s - s.mean(dim=(0, 2), keepdim=True)
    t_centred = t - t.mean(dim=(0, 2), keepdim=True)
    expected = torch.nn.functional.cosine_similarity(s_centred, t_centred, dim=-1).mean()
    _, metrics = MercatorKVLoss(centred=True)(s, t)
    assert metrics["centred_cos"] == pytest.approx(expected.item(), abs=1e-12)


def test_magnitude_term_uses_raw_vectors(unit_pair):
    u, _ = unit_pair
    s = torch.stack([u, 2.0 * u]).unsqueeze(0).unsqueeze(0)
    t = torch.stack([10.0 * u, 20.0 * u]).unsqueeze(0).unsqueeze(0)
    _, metrics = MercatorKVLoss(beta=1.0, centred=True)(s, t)
    assert metrics["mag_loss"] == pytest.approx(math.log(10.0) ** 2, rel=1e-9)


# MSE, hybrid and the factory.


def test_mse_reports_cosine_side(unit_pair):
    u, w = unit_pair
    loss, metrics = MSEKVLoss()(u, w)
    assert loss.item() == pytest.approx(2.0 / DIM, rel=1e-9)
    assert metrics["mse"] == pytest.approx(2.0 / DIM, rel=1e-9)
    assert metrics["dir_loss"] == pytest.approx(1.0, abs=1e-12)


def test_hybrid_default_weights():
    generator = torch.Generator().manual_seed(8)
    s = torch.randn(1, 2, 5, 16, generator=generator, dtype=torch.float64)
    t = torch.randn(1, 2, 5, 16, generator=generator, dtype=torch.float64)
    mercator, _ = MercatorKVLoss()(s, t)
    mse, _ = MSEKVLoss()(s, t)
    hybrid, metrics = HybridKVLoss()(s, t)
    assert hybrid.item() == pytest.approx(0.8 * mercator.item() + 0.2 * mse.item(), abs=1e-12)
    assert metrics["loss"] == pytest.approx(hybrid.item(), abs=1e-12)


def test_build_loss_names():
    assert isinstance(build_loss("mercator"), MercatorKVLoss)
    assert build_loss("mercator").centred is False
    assert build_loss("mercator_centred").centred is True
    assert isinstance(build_loss("mse"), MSEKVLoss)
    assert isinstance(build_loss("hybrid"), HybridKVLoss)
    assert build_loss("mercator", alpha=2.0, beta=0.01).beta == 0.01


def test_build_loss_unknown_name():
    with pytest.raises(ValueError, match=r"'cosine'.*mercator, mercator_centred, mse, hybrid"):
        build_loss("cosine")


def test_negative_beta_raises():
    with pytest.raises(ValueError, match="beta=-0.1"):
        MercatorKVLoss(beta=-0.1)


# Properties.

_scales = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(student_scale=_scales, teacher_scale=_scales, seed=st.integers(0, 2**16))
def test_invariant_to_positive_scale(student_scale, teacher_scale, seed):
    generator = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, 4, 16, generator=generator, dtype=torch.float64)
    t = torch.randn(2, 3, 4, 16, generator=generator, dtype=torch.float64)
    for centred in (False, True):
        loss_fn = MercatorKVLoss(beta=0.0, centred=centred)
        loss, _ = loss_fn(s, t)
        scaled, _ = loss_fn(student_scale * s, teacher_scale * t)
        assert scaled.item() == pytest.approx(loss.item(), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(shift=st.floats(min_value=-100, max_value=100, allow_nan=False), seed=st.integers(0, 2**16))
def test_centred_invariant_to_layer_shift(shift, seed):
    generator = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, 5, 8, generator=generator, dtype=torch.float64)
    t = torch.randn(2, 3, 5, 8, generator=generator, dtype=torch.float64)
    layer_shift = shift * torch.randn(1, 3, 1, 8, generator=generator, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    loss_fn = MercatorKVLoss(centred=True)
    loss, _ = loss_fn(s, t, mask)
    shifted, _ = loss_fn(s + layer_shift, t - layer_shift, mask)
    assert shifted.item() == pytest.approx(loss.item(), abs=1e-9)


# Variance floor: per-layer spread of the student's K/V over real tokens.


def _two_layer_student() -> tuple[torch.Tensor, torch.Tensor]:
    """Build two layers: layer 0 alternates +1 and -1 in every channel (std 1), layer 1 is constant 5 (std 0).

    The fifth token is padding and contains NaN.
    """
    x = torch.empty(1, 2, 5, 3)
    x[0, 0, :4] = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None]
    x[0, 1, :4] = 5.0
    x[0, :, 4] = math.nan
    mask = torch.tensor([[True, True, True, True, False]])
    return x, mask


def test_layer_std_known_values():
    x, mask = _two_layer_student()
    assert layer_std(x, mask).tolist() == pytest.approx([1.0, 0.0], abs=1e-7)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # Layer 0 at or above target adds 0; a constant layer adds 1 - sqrt(1e-4) = 0.99.
        (1.0, (0.0 + 0.99) / 2),
        (2.0, ((1 - math.sqrt(0.25 + 1e-4)) + 0.99) / 2),
        (0.5, (0.0 + 0.99) / 2),
    ],
)
def test_variance_floor_penalty_values(target, expected):
    x, mask = _two_layer_student()
    penalty, std = variance_floor_penalty(x, torch.tensor([target, target]), mask)
    assert penalty.item() == pytest.approx(expected, abs=1e-6)
    assert std.tolist() == pytest.approx([1.0, 0.0], abs=1e-7)


def test_variance_floor_pushes_spread_up():
    generator = torch.Generator().manual_seed(0)
    x = (1.0 + 1e-3 * torch.randn(1, 1, 16, 8, generator=generator)).requires_grad_(True)
    penalty, _ = variance_floor_penalty(x, torch.tensor([1.0]))
    penalty.backward()
    assert torch.isfinite(x.grad).all()
    # A gradient step against the penalty moves every token further from the mean.
    stepped = x.detach() - 10.0 * x.grad
    assert layer_std(stepped).item() > layer_std(x.detach()).item()


# Token-level losses on the student's logits.


def test_next_token_mask_and_ids():
    input_ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    attention = torch.tensor([[True, True, True, False], [True, True, False, False]])
    answer = torch.tensor([[False, False, True, False], [False, True, False, False]])
    assert next_token_mask(attention).tolist() == [[True, True, False, False], [True, False, False, False]]
    assert next_token_mask(attention, answer).tolist() == [[False, True, False, False], [True, False, False, False]]
    assert next_token_ids(input_ids).tolist() == [[6, 7, 0, 0], [9, 0, 0, 0]]


def test_answer_cross_entropy_value():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    loss = answer_cross_entropy(logits, torch.tensor([1, 1]))
    assert loss.item() == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2, rel=1e-6)
    assert answer_cross_entropy(torch.empty(0, 2), torch.empty(0, dtype=torch.long)).item() == 0.0


def test_topk_kl_renormalises_teacher():
    # Teacher top-2 holds 0.6 and 0.2 of its mass, so renormalised p = (0.75, 0.25);
    # a uniform student over 4 tokens has q = 0.25 on each.
    uniform = torch.zeros(1, 4)
    ids = torch.tensor([[0, 1]])
    logprobs = torch.tensor([[math.log(0.6), math.log(0.2)]])
    kl = topk_kl_divergence(uniform, ids, logprobs)
    assert kl.item() == pytest.approx(0.75 * math.log(3.0), rel=1e-6)


def test_topk_kl_temperature():
    uniform = torch.zeros(1, 4)
    ids = torch.tensor([[0, 1]])
    logprobs = torch.tensor([[math.log(0.6), math.log(0.2)]])
    tempered = [math.sqrt(0.6), math.sqrt(0.2)]
    p = [v / sum(tempered) for v in tempered]
    expected = 4.0 * sum(pi * math.log(pi / 0.25) for pi in p)
    assert topk_kl_divergence(uniform, ids, logprobs, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_topk_kl_zero_when_student_matches():
    student = torch.tensor([[math.log(0.75), math.log(0.25), -1e4, -1e4]])
    kl = topk_kl_divergence(student, torch.tensor([[0, 1]]), torch.tensor([[math.log(0.6), math.log(0.2)]]))
    assert kl.item() == pytest.approx(0.0, abs=1e-6)


def test_topk_kl_ignores_missing_candidates():
    student = torch.tensor([[0.0, math.log(3.0), 0.0]])  # q = (0.2, 0.6, 0.2)
    kl = topk_kl_divergence(student, torch.tensor([[1, 2]]), torch.tensor([[0.0, -math.inf]]))
    assert kl.item() == pytest.approx(-math.log(0.6), rel=1e-6)


def test_topk_kl_non_negative_and_differentiable():
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(6, 10, generator=generator, requires_grad=True)
    ids = torch.stack([torch.randperm(10, generator=generator)[:3] for _ in range(6)])
    logprobs = torch.log_softmax(torch.randn(6, 10, generator=generator), dim=-1).gather(-1, ids)
    kl = topk_kl_divergence(student, ids, logprobs, temperature=1.5)
    kl.backward()
    assert kl.item() > 0
    assert torch.isfinite(student.grad).all()


def test_topk_kl_shape_mismatch_raises():
    with pytest.raises(ValueError, match="must both be"):
        topk_kl_divergence(torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2))


# The verification script users run by hand.


def test_verify_script_passes():
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "verify_map_projection.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "[PASS] Verification successful!" in completed.stdout
    assert "MSE Loss: 76.57 (treats as error)" in completed.stdout
    assert "Mercator Loss: 0.000000 (recognizes alignment)" in completed.stdout
    assert "Cosine Sim: 1.000000 (perfect match)" in completed.stdout
    assert "60 deg: +0.50000" in completed.stdout
    assert "[FAIL]" not in completed.stdout
