"""Tests for the held-out alignment metrics, their baselines and labels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.alignment import (
    METRIC_NAMES,
    AlignmentMeter,
    alignment_label,
    collapse_warning,
    format_alignment,
    kv_layer_names,
)


def _run_meter(batches, **kwargs) -> dict:
    """Feed (student, teacher, mask) batches through both passes and return the result."""
    meter = AlignmentMeter(**kwargs)
    for student, teacher, mask in batches:
        meter.add_means(student, teacher, mask)
    meter.finish_means()
    for student, teacher, mask in batches:
        meter.add(student, teacher, mask)
    return meter.result()


def _random_kv(batch=2, layers=3, tokens=7, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, layers, tokens, dim, generator=generator, dtype=torch.float64)


def _direct_metrics(student, teacher, mask):
    """Compute raw, centred and baseline cosine on the full tensors at once."""
    layers, dim = student.shape[1], student.shape[-1]
    keep = mask.reshape(-1)
    s = student.transpose(0, 1).reshape(layers, -1, dim)[:, keep]
    t = teacher.transpose(0, 1).reshape(layers, -1, dim)[:, keep]
    s_mean = s.mean(dim=1, keepdim=True)
    t_mean = t.mean(dim=1, keepdim=True)
    return {
        "raw_cos": F.cosine_similarity(s, t, dim=-1).mean(dim=1),
        "centred_cos": F.cosine_similarity(s - s_mean, t - t_mean, dim=-1).mean(dim=1),
        "baseline_cos": F.cosine_similarity(s, s_mean.expand_as(s), dim=-1).mean(dim=1),
        "teacher_baseline_cos": F.cosine_similarity(t, t_mean.expand_as(t), dim=-1).mean(dim=1),
    }


# Known answers.


def test_offset_student_centred_one():
    teacher = _random_kv()
    offset = 20.0 * _random_kv(batch=1, tokens=1, seed=1)
    result = _run_meter([(teacher + offset, teacher, None)])
    assert result["centred_cos"] == pytest.approx(1.0, abs=1e-12)
    assert result["raw_cos"] < 0.9


def test_constant_student_baseline_one():
    teacher = _random_kv(tokens=20)
    student = _random_kv(batch=1, tokens=1, seed=2).expand_as(teacher).clone()
    result = _run_meter([(student, teacher, None)])
    assert result["baseline_cos"] == pytest.approx(1.0, abs=1e-12)
    assert result["centred_cos"] == pytest.approx(0.0, abs=1e-6)


def test_identical_sides_score_one():
    kv = _random_kv()
    result = _run_meter([(kv, kv.clone(), None)])
    assert result["raw_cos"] == pytest.approx(1.0, abs=1e-12)
    assert result["centred_cos"] == pytest.approx(1.0, abs=1e-12)


def test_shuffled_never_self_paired():
    # Orthogonal token vectors: any token paired with itself would add 1.
    tokens = 12
    kv = torch.eye(tokens, dtype=torch.float64).reshape(1, 1, tokens, tokens)
    result = _run_meter([(kv, kv.clone(), None)], seed=5)
    assert result["raw_cos"] == pytest.approx(1.0)
    assert result["shuffled_raw_cos"] == pytest.approx(0.0, abs=1e-12)
    assert result["shuffled_tokens"] == tokens


def test_shuffled_near_zero_random():
    kv = _random_kv(batch=4, layers=2, tokens=64, dim=64, seed=3)
    result = _run_meter([(kv, kv.clone(), None)])
    assert abs(result["shuffled_raw_cos"]) < 0.05
    assert abs(result["shuffled_centred_cos"]) < 0.05


def test_shuffled_seed_reproducible():
    s, t = _random_kv(seed=6), _random_kv(seed=7)
    first = _run_meter([(s, t, None)], seed=11)
    again = _run_meter([(s, t, None)], seed=11)
    other = _run_meter([(s, t, None)], seed=12)
    assert first["shuffled_raw_cos"] == again["shuffled_raw_cos"]
    assert first["shuffled_raw_cos"] != other["shuffled_raw_cos"]


def test_single_token_batches_skip_shuffle():
    s, t = _random_kv(batch=1, tokens=1), _random_kv(batch=1, tokens=1, seed=1)
    result = _run_meter([(s, t, None), (t, s, None)])
    assert result["tokens"] == 2
    assert result["shuffled_tokens"] == 0
    assert math.isnan(result["shuffled_raw_cos"])


# Streaming equals the direct computation, and padding changes nothing.


def test_streaming_matches_direct():
    student, teacher = _random_kv(batch=5, tokens=9, seed=8), _random_kv(batch=5, tokens=9, seed=9)
    teacher = teacher + 0.5 * student + 3.0
    mask = torch.ones(5, 9, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    batches = [(student[:2], teacher[:2], mask[:2]), (student[2:], teacher[2:], mask[2:])]
    result = _run_meter(batches)
    expected = _direct_metrics(student, teacher, mask)
    for name, per_layer in expected.items():
        assert result["per_layer"][name] == pytest.approx(per_layer.tolist(), abs=1e-10), name
        assert result[name] == pytest.approx(per_layer.mean().item(), abs=1e-10), name
    assert result["tokens"] == int(mask.sum())


def test_padding_changes_nothing():
    student, teacher = _random_kv(tokens=6, seed=10), _random_kv(tokens=6, seed=11)
    padded_student = torch.full((2, 3, 10, 16), math.nan, dtype=torch.float64)
    padded_teacher = torch.full((2, 3, 10, 16), math.inf, dtype=torch.float64)
    padded_student[:, :, :6] = student
    padded_teacher[:, :, :6] = teacher
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :6] = True
    plain = _run_meter([(student, teacher, None)])
    padded = _run_meter([(padded_student, padded_teacher, mask)])
    assert padded == plain


def test_result_keys_and_layer_names():
    kv = _random_kv(layers=4)
    result = _run_meter([(kv, kv.clone(), None)], layer_names=kv_layer_names(2))
    assert set(METRIC_NAMES) <= set(result)
    assert result["layer_names"] == ["key_0", "key_1", "value_0", "value_1"]
    assert set(result["per_layer"]) == set(METRIC_NAMES)
    assert all(len(values) == 4 for values in result["per_layer"].values())


def test_bfloat16_inputs_accepted():
    kv = _random_kv().float()
    result = _run_meter([(kv.bfloat16(), kv.bfloat16(), None)])
    assert result["raw_cos"] == pytest.approx(1.0, abs=1e-5)


# Misuse.


def test_add_before_finish_means():
    meter = AlignmentMeter()
    kv = _random_kv()
    meter.add_means(kv, kv)
    with pytest.raises(RuntimeError, match="finish_means"):
        meter.add(kv, kv)


def test_finish_means_without_tokens():
    with pytest.raises(RuntimeError, match="empty"):
        AlignmentMeter().finish_means()


def test_add_means_after_finish():
    meter = AlignmentMeter()
    kv = _random_kv()
    meter.add_means(kv, kv)
    meter.finish_means()
    with pytest.raises(RuntimeError, match="pass 1 is closed"):
        meter.add_means(kv, kv)


def test_result_before_add():
    meter = AlignmentMeter()
    kv = _random_kv()
    meter.add_means(kv, kv)
    meter.finish_means()
    with pytest.raises(RuntimeError, match="add"):
        meter.result()


def test_passes_see_different_tokens():
    meter = AlignmentMeter()
    kv = _random_kv()
    meter.add_means(kv, kv)
    meter.add_means(kv, kv)
    meter.finish_means()
    meter.add(kv, kv)
    with pytest.raises(ValueError, match="pass 1 saw 28 real tokens but pass 2 saw 14"):
        meter.result()


def test_layer_count_changes():
    meter = AlignmentMeter()
    meter.add_means(_random_kv(layers=3), _random_kv(layers=3))
    with pytest.raises(ValueError, match="2 layers of width 16.*3 layers of width 16"):
        meter.add_means(_random_kv(layers=2), _random_kv(layers=2))


def test_layer_names_length_checked():
    meter = AlignmentMeter(layer_names=["key_0", "value_0"])
    with pytest.raises(ValueError, match="2 layer_names given but the input has 3 layers"):
        meter.add_means(_random_kv(layers=3), _random_kv(layers=3))


# Labels and warnings.


@pytest.mark.parametrize(
    ("cos", "label"),
    [(0.99, "Excellent"), (0.951, "Excellent"), (0.95, "Good"), (0.81, "Good"), (0.80, "Acceptable"),
     (0.51, "Acceptable"), (0.50, "Poor"), (-0.3, "Poor")],
)
def test_alignment_label_thresholds(cos, label):
    assert alignment_label(cos) == label


def test_alignment_label_rejects_nan():
    with pytest.raises(ValueError, match="non-finite"):
        alignment_label(math.nan)


def test_collapse_warning_near_baseline():
    message = collapse_warning(0.997, 0.989)
    assert message is not None
    assert "0.997" in message
    assert "0.989" in message
    assert "\n" not in message


def test_collapse_warning_clear_gap():
    assert collapse_warning(0.69, 0.40) is None


def test_collapse_warning_custom_margin():
    assert collapse_warning(0.90, 0.80, margin=0.2) is not None


def test_format_alignment_labels_centred():
    kv = _random_kv()
    line = format_alignment(_run_meter([(kv, kv.clone(), None)]))
    assert "centred cos 1.0000 (Excellent" in line
    assert "tokens 14" in line


def test_kv_layer_names():
    assert kv_layer_names(3) == ["key_0", "key_1", "key_2", "value_0", "value_1", "value_2"]


# Per-head figures.


def test_per_head_matches_direct_slices():
    student, teacher = _random_kv(dim=12), _random_kv(dim=12, seed=1)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    result = _run_meter([(student, teacher, mask)], num_heads=3)
    assert result["num_heads"] == 3
    for head in range(3):
        channels = slice(4 * head, 4 * head + 4)
        direct = _direct_metrics(student[..., channels], teacher[..., channels], mask)
        for name, values in direct.items():
            got = [row[head] for row in result["per_head"][name]]
            assert got == pytest.approx(values.tolist(), abs=1e-12), (name, head)


def test_per_head_shows_collapsed_head():
    teacher = _random_kv(tokens=50, dim=8)
    student = teacher.clone()
    student[..., :4] = 3.0  # head 0 of the student outputs the same vector for every token
    result = _run_meter([(student, teacher, None)], num_heads=2)
    for layer in range(3):
        assert result["per_head"]["baseline_cos"][layer][0] == pytest.approx(1.0, abs=1e-12)
        assert result["per_head"]["centred_cos"][layer][0] == pytest.approx(0.0, abs=1e-12)
        assert result["per_head"]["centred_cos"][layer][1] == pytest.approx(1.0, abs=1e-12)


def test_one_head_equals_per_layer():
    student, teacher = _random_kv(), _random_kv(seed=1)
    result = _run_meter([(student, teacher, None)], num_heads=1)
    for name in METRIC_NAMES:
        assert [row[0] for row in result["per_head"][name]] == pytest.approx(result["per_layer"][name], abs=1e-12)


def test_per_head_leaves_overall_unchanged():
    student, teacher = _random_kv(), _random_kv(seed=1)
    plain = _run_meter([(student, teacher, None)], seed=3)
    with_heads = _run_meter([(student, teacher, None)], seed=3, num_heads=4)
    for name in METRIC_NAMES:
        assert with_heads[name] == plain[name]
    assert "per_head" not in plain


def test_per_head_shuffled_nan_without_pairs():
    kv = _random_kv(batch=1, tokens=1)
    result = _run_meter([(kv, kv.clone(), None)], num_heads=2)
    assert all(math.isnan(value) for row in result["per_head"]["shuffled_raw_cos"] for value in row)


def test_heads_must_divide_width():
    meter = AlignmentMeter(num_heads=5)
    kv = _random_kv(dim=16)
    with pytest.raises(ValueError, match="not divisible by num_heads 5"):
        meter.add_means(kv, kv)


@pytest.mark.parametrize("num_heads", [0, -1, 2.0, True])
def test_num_heads_must_be_positive_int(num_heads):
    with pytest.raises(ValueError, match="num_heads must be a positive integer"):
        AlignmentMeter(num_heads=num_heads)


def test_collapse_warning_raw_far_above_centred():
    # Figures of a 2000-step raw Mercator run on the embedded default: far from the
    # baseline, yet most of the raw agreement is the shared mean direction.
    message = collapse_warning(0.998, 0.886, centred_cos=0.425)
    assert message is not None
    assert "centred cosine 0.425" in message
    assert "partial collapse" in message


def test_collapse_warning_centred_above_raw():
    assert collapse_warning(0.788, 0.442, centred_cos=0.981) is None
    assert collapse_warning(0.80, 0.40, centred_cos=0.55) is None
