"""Tests for the layer maps and the teacher-to-student K/V projector."""

from __future__ import annotations

import pytest
import torch

from distill.projector import LAYER_MAPS, KVDimensionProjector, layer_map_matrix, module_key

# Real KV widths and depths of Qwen2.5-14B (teacher) and Qwen2.5-1.5B (student).
TEACHER = "Qwen2.5-14B"
TEACHER_WIDTH = 1024
TEACHER_LAYERS = 48
STUDENT_WIDTH = 256
STUDENT_LAYERS = 28
ELASTIC_ADAPTER_PARAMETERS = 2_048 + 1_049_600 + 262_400


def _qwen_projector(**kwargs) -> KVDimensionProjector:
    return KVDimensionProjector(
        teacher_configs={TEACHER: {"d_model": TEACHER_WIDTH, "num_layers": TEACHER_LAYERS}},
        student_d_model=STUDENT_WIDTH,
        mlp_ratio=1.0,
        dropout=0.1,
        student_num_layers=STUDENT_LAYERS,
        **kwargs,
    )


def _teacher_kv(batch: int = 1, layers: int = TEACHER_LAYERS, tokens: int = 3, width: int = TEACHER_WIDTH):
    generator = torch.Generator().manual_seed(0)
    k = torch.randn(batch, layers, tokens, width, generator=generator)
    v = torch.randn(batch, layers, tokens, width, generator=generator)
    return k, v


# Layer maps.


@pytest.mark.parametrize("kind", LAYER_MAPS)
def test_layer_map_rows_sum_to_one(kind):
    matrix = layer_map_matrix(STUDENT_LAYERS, TEACHER_LAYERS, kind)
    assert matrix.shape == (STUDENT_LAYERS, TEACHER_LAYERS)
    assert torch.allclose(matrix.sum(dim=1), torch.ones(STUDENT_LAYERS))
    assert (matrix >= 0).all()


@pytest.mark.parametrize("kind", ["ratio", "uniform"])
def test_layer_map_first_and_last(kind):
    matrix = layer_map_matrix(STUDENT_LAYERS, TEACHER_LAYERS, kind)
    assert matrix[0, 0] == 1.0
    assert matrix[-1, -1] == 1.0


def test_ratio_blend_weights():
    # 4 student layers over 6 teacher layers: p = 0, 5/3, 10/3, 5.
    expected = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 1 / 3, 2 / 3, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 2 / 3, 1 / 3, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
        ]
    )
    assert torch.allclose(layer_map_matrix(4, 6, "ratio"), expected)


def test_ratio_half_blend():
    # 3 student layers over 4 teacher layers: the middle one sits at p = 1.5.
    assert layer_map_matrix(3, 4, "ratio")[1].tolist() == [0.0, 0.5, 0.5, 0.0]


def test_uniform_indices():
    assert layer_map_matrix(4, 6, "uniform").argmax(dim=1).tolist() == [0, 2, 3, 5]
    assert layer_map_matrix(3, 4, "uniform").argmax(dim=1).tolist() == [0, 2, 3]


def test_skip_indices():
    assert layer_map_matrix(4, 10, "skip").argmax(dim=1).tolist() == [0, 2, 4, 6]
    assert layer_map_matrix(STUDENT_LAYERS, TEACHER_LAYERS, "skip").argmax(dim=1).tolist() == list(range(28))


def test_skip_clamps_deep_student():
    assert layer_map_matrix(5, 3, "skip").argmax(dim=1).tolist() == [0, 1, 2, 2, 2]


def test_random_map_seeded():
    first = layer_map_matrix(STUDENT_LAYERS, TEACHER_LAYERS, "random", seed=3)
    again = layer_map_matrix(STUDENT_LAYERS, TEACHER_LAYERS, "random", seed=3)
    other = layer_map_matrix(STUDENT_LAYERS, TEACHER_LAYERS, "random", seed=4)
    chosen = first.argmax(dim=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len(set(chosen.tolist())) == STUDENT_LAYERS
    assert chosen.tolist() != sorted(chosen.tolist())


def test_single_student_layer_maps_first():
    for kind in ("ratio", "uniform", "skip"):
        assert layer_map_matrix(1, 5, kind).tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]]


def test_layer_map_unknown_kind():
    with pytest.raises(ValueError, match=r"'linear'.*ratio, uniform, skip, random"):
        layer_map_matrix(2, 4, "linear")


def test_layer_map_zero_layers():
    with pytest.raises(ValueError, match="num_teacher_layers.*0"):
        layer_map_matrix(2, 0, "ratio")


# Projector shapes and parameter counts.


def test_projector_output_shapes():
    projector = _qwen_projector()
    k, v = _teacher_kv(batch=1, tokens=3)
    out_k, out_v = projector.project_teacher_kv(TEACHER, k, v)
    assert out_k.shape == (1, STUDENT_LAYERS, 3, STUDENT_WIDTH)
    assert out_v.shape == (1, STUDENT_LAYERS, 3, STUDENT_WIDTH)


def test_elastic_parameter_count():
    projector = _qwen_projector()
    assert ELASTIC_ADAPTER_PARAMETERS == 1_314_048
    assert projector.num_parameters() == 2_628_096
    assert projector.num_parameters(TEACHER) == 2_628_096


def test_linear_parameter_count():
    projector = _qwen_projector(projector_type="linear")
    assert projector.num_parameters() == 2 * (1024 * 256 + 256)


def test_per_layer_parameter_count():
    projector = _qwen_projector(per_layer=True)
    assert projector.num_parameters() == STUDENT_LAYERS * 2_628_096


def test_per_layer_output_shapes():
    projector = KVDimensionProjector({"t": {"d_model": 16, "num_layers": 6}}, 8, student_num_layers=3, per_layer=True)
    out_k, out_v = projector("t", *_teacher_kv(batch=2, layers=6, tokens=4, width=16))
    assert out_k.shape == (2, 3, 4, 8)
    assert out_v.shape == (2, 3, 4, 8)


def test_mlp_ratio_two_hidden_width():
    projector = KVDimensionProjector({"t": {"d_model": 16}}, 8, mlp_ratio=2.0)
    # LayerNorm 32 + Linear(16, 32) 544 + Linear(32, 8) 264, for K and V.
    assert projector.num_parameters() == 2 * (32 + 544 + 264)


def test_original_call_works():
    projector = KVDimensionProjector(
        teacher_configs={"Qwen2-14B": {"d_model": 1024, "num_layers": 48}},
        student_d_model=256,
        mlp_ratio=1.0,
        dropout=0.1,
    )
    out_k, _ = projector.project_teacher_kv("Qwen2-14B", *_teacher_kv(tokens=2))
    assert out_k.shape == (1, 48, 2, 256)


# Layer map applied inside the projector.


def test_layer_map_applied_first():
    projector = KVDimensionProjector(
        {"t": {"d_model": 4, "num_layers": 3}}, 4, dropout=0.0, student_num_layers=2, projector_type="linear"
    )
    adapter = projector.adapters["t"].key_adapter
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(4))
        adapter.bias.zero_()
    k = torch.arange(3, dtype=torch.float32).reshape(1, 3, 1, 1).expand(1, 3, 1, 4)
    out_k, _ = projector("t", k, k)
    # Student layer 0 reads teacher layer 0, student layer 1 reads teacher layer 2.
    assert out_k[0, :, 0, 0].tolist() == [0.0, 2.0]


def test_layer_map_not_in_state_dict():
    projector = _qwen_projector()
    assert all("layer_map" not in key for key in projector.state_dict())
    assert projector.layer_map_for(TEACHER).shape == (STUDENT_LAYERS, TEACHER_LAYERS)


def test_inferred_teacher_depth():
    projector = KVDimensionProjector({"t": {"d_model": 16}}, 8, student_num_layers=2)
    assert projector.layer_map_for("t") is None
    out_k, _ = projector("t", *_teacher_kv(layers=5, width=16))
    assert out_k.shape == (1, 2, 3, 8)
    assert projector.layer_map_for("t").shape == (2, 5)
    with pytest.raises(ValueError, match="4 layers.*num_layers 5"):
        projector("t", *_teacher_kv(layers=4, width=16))


def test_identity_map_without_student_depth():
    projector = KVDimensionProjector({"t": {"d_model": 16, "num_layers": 5}}, 8)
    assert torch.equal(projector.layer_map_for("t"), torch.eye(5))


def test_bfloat16_input_cast():
    projector = KVDimensionProjector({"t": {"d_model": 16, "num_layers": 2}}, 8, student_num_layers=2)
    k, v = _teacher_kv(layers=2, width=16)
    out_k, _ = projector("t", k.bfloat16(), v.bfloat16())
    assert out_k.dtype == torch.float32


def test_gradients_reach_adapters():
    projector = _qwen_projector()
    out_k, out_v = projector(TEACHER, *_teacher_kv(tokens=2))
    (out_k.square().mean() + out_v.square().mean()).backward()
    adapters = projector.adapters[module_key(TEACHER)]
    assert adapters.key_adapter[1].weight.grad is not None
    assert adapters.value_adapter[4].weight.grad is not None


# Several teachers.


def test_several_teachers():
    projector = KVDimensionProjector(
        {"Qwen2.5-14B": {"d_model": 32, "num_layers": 6}, "Llama-3.1-8B": {"d_model": 16, "num_layers": 4}},
        8,
        dropout=0.0,
        student_num_layers=2,
    )
    out_qwen, _ = projector("Qwen2.5-14B", *_teacher_kv(layers=6, width=32))
    out_llama, _ = projector("Llama-3.1-8B", *_teacher_kv(layers=4, width=16))
    assert projector.teacher_names == ["Qwen2.5-14B", "Llama-3.1-8B"]
    assert set(projector.adapters) == {"Qwen2_5-14B", "Llama-3_1-8B"}
    assert out_qwen.shape == (1, 2, 3, 8)
    assert out_llama.shape == (1, 2, 3, 8)
    assert projector.num_parameters() == projector.num_parameters("Qwen2.5-14B") + projector.num_parameters(
        "Llama-3.1-8B"
    )


def test_module_key_sanitises():
    assert module_key("Qwen2.5-14B") == "Qwen2_5-14B"
    assert module_key("org/model v2") == "org_model_v2"
    assert module_key("keys") == "teacher_keys"


def test_clashing_teacher_keys():
    with pytest.raises(ValueError, match="'a.b' and 'a_b'"):
        KVDimensionProjector({"a.b": {"d_model": 4}, "a_b": {"d_model": 4}}, 4)


# Invalid input.


def test_unknown_teacher_name():
    projector = _qwen_projector()
    with pytest.raises(KeyError, match="'Qwen2-7B'.*Qwen2.5-14B"):
        projector.project_teacher_kv("Qwen2-7B", *_teacher_kv())


def test_wrong_teacher_width():
    projector = _qwen_projector()
    with pytest.raises(ValueError, match="width 512.*d_model 1024"):
        projector.project_teacher_kv(TEACHER, *_teacher_kv(width=512))


def test_wrong_teacher_depth():
    projector = _qwen_projector()
    with pytest.raises(ValueError, match="40 layers.*num_layers 48"):
        projector.project_teacher_kv(TEACHER, *_teacher_kv(layers=40))


def test_wrong_rank():
    projector = _qwen_projector()
    with pytest.raises(ValueError, match=r"got shape \(48, 3, 1024\)"):
        projector.project_teacher_kv(TEACHER, torch.zeros(48, 3, 1024), torch.zeros(48, 3, 1024))


def test_k_v_shape_mismatch():
    projector = _qwen_projector()
    k, _ = _teacher_kv(tokens=3)
    _, v = _teacher_kv(tokens=4)
    with pytest.raises(ValueError, match="shapes differ"):
        projector.project_teacher_kv(TEACHER, k, v)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layer_map": "nearest"}, r"'nearest'.*ratio, uniform, skip, random"),
        ({"projector_type": "mlp"}, r"'mlp'.*elastic, linear"),
        ({"dropout": 1.0}, r"dropout.*1.0"),
        ({"mlp_ratio": 0.0}, r"mlp_ratio.*0.0"),
        ({"student_num_layers": 0}, r"student_num_layers.*0"),
    ],
)
def test_invalid_constructor_args(kwargs, message):
    arguments = {"teacher_configs": {"t": {"d_model": 8}}, "student_d_model": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        KVDimensionProjector(**arguments)


def test_per_layer_needs_student_depth():
    with pytest.raises(ValueError, match="student_num_layers"):
        KVDimensionProjector({"t": {"d_model": 8}}, 4, per_layer=True)


def test_teacher_config_unknown_key():
    with pytest.raises(ValueError, match=r"\['num_layer'\].*d_model, num_layers"):
        KVDimensionProjector({"t": {"d_model": 8, "num_layer": 4}}, 4)


def test_teacher_config_missing_width():
    with pytest.raises(ValueError, match="missing 'd_model'"):
        KVDimensionProjector({"t": {"num_layers": 4}}, 4)


def test_empty_teacher_configs():
    with pytest.raises(ValueError, match="empty"):
        KVDimensionProjector({}, 4)


def test_projector_moves_between_devices_and_dtypes():
    # nn.Module.to() walks every submodule; a helper named like a Module internal breaks it.
    projector = KVDimensionProjector({"t": {"d_model": 8, "num_layers": 3}}, student_d_model=4, student_num_layers=2)
    moved = projector.to(torch.device("cpu")).to(torch.float64)
    keys = torch.randn(1, 3, 5, 8, dtype=torch.float64)
    k, v = moved.project_teacher_kv("t", keys, keys)
    assert k.dtype == torch.float64
    assert v.shape == (1, 2, 5, 4)
