"""Projector from teacher K/V to the student's K/V layout: a layer map, then adapters.

Widths here are KV widths (``kv_heads * head_dim``), not hidden sizes: 1024 for
Qwen2.5-14B and 256 for Qwen2.5-1.5B. The projector does not depend on the store.
The trainer builds it from the widths and depths in the store manifest and the
student config.

A layer map is a ``[student_layers, teacher_layers]`` matrix whose rows sum to 1. Row
``i`` says which teacher layers, with which weights, feed student layer ``i``. For the
interpolating maps, ``p = i * (L_t - 1) / (L_s - 1)`` places student layer ``i`` on the
teacher's depth axis, so the first student layer maps to the first teacher layer and
the last to the last. A one-layer student gets ``p = 0``, the teacher's first layer.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

LAYER_MAPS: tuple[str, ...] = ("ratio", "uniform", "skip", "random")
PROJECTOR_TYPES: tuple[str, ...] = ("elastic", "linear")
TEACHER_CONFIG_KEYS: tuple[str, ...] = ("d_model", "num_layers")


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _random_layer_choice(num_student_layers: int, num_teacher_layers: int, seed: int) -> list[int]:
    # Draw whole permutations of the teacher layers and take them in order, so layers
    # repeat only after every teacher layer has been used once.
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    while len(chosen) < num_student_layers:
        chosen.extend(torch.randperm(num_teacher_layers, generator=generator).tolist())
    return chosen[:num_student_layers]


def layer_map_matrix(num_student_layers: int, num_teacher_layers: int, kind: str, *, seed: int = 0) -> Tensor:
    """Build the ``[num_student_layers, num_teacher_layers]`` float32 layer map.

    Kinds, with ``p`` the student layer's position on the teacher's depth axis:

    - ``ratio``: blend teacher layers ``floor(p)`` and ``ceil(p)`` with weights
      ``1 - frac(p)`` and ``frac(p)``.
    - ``uniform``: teacher layer ``round(p)``, rounding halves up.
    - ``skip``: teacher layer ``i * floor(L_t / L_s)``. The step is at least 1 and the
      index is clamped to the last teacher layer, so a student deeper than the teacher
      ends with several rows on the last layer.
    - ``random``: one teacher layer per student layer in a random order fixed by
      ``seed``. Distinct layers while ``L_s <= L_t``. A control that breaks the
      correspondence of depth.

    ``p`` is computed in integer arithmetic, so the last student layer lands exactly
    on the last teacher layer.

    Raises:
        ValueError: for a non-positive layer count or an unknown ``kind``.
    """
    num_student_layers = _check_positive_int(num_student_layers, "num_student_layers")
    num_teacher_layers = _check_positive_int(num_teacher_layers, "num_teacher_layers")
    if kind not in LAYER_MAPS:
        raise ValueError(f"unknown layer map {kind!r}; valid kinds: {', '.join(LAYER_MAPS)}")

    matrix = torch.zeros(num_student_layers, num_teacher_layers, dtype=torch.float32)
    if kind == "random":
        for i, j in enumerate(_random_layer_choice(num_student_layers, num_teacher_layers, seed)):
            matrix[i, j] = 1.0
        return matrix

    if kind == "skip":
        step = max(1, num_teacher_layers // num_student_layers)
        for i in range(num_student_layers):
            matrix[i, min(i * step, num_teacher_layers - 1)] = 1.0
        return matrix

    # p = numerator / denominator, exactly.
    denominator = max(num_student_layers - 1, 1)
    for i in range(num_student_layers):
        numerator = i * (num_teacher_layers - 1) if num_student_layers > 1 else 0
        low, remainder = divmod(numerator, denominator)
        if kind == "uniform":
            nearest = low + (1 if 2 * remainder >= denominator else 0)
            matrix[i, nearest] = 1.0
        elif remainder == 0:
            matrix[i, low] = 1.0
        else:
            fraction = remainder / denominator
            matrix[i, low] = 1.0 - fraction
            matrix[i, low + 1] = fraction
    return matrix


def elastic_bottleneck(teacher_width: int, student_width: int, mlp_ratio: float, dropout: float) -> nn.Sequential:
    """Build one Elastic Bottleneck adapter.

    ``LayerNorm(d_t) -> Linear(d_t, int(d_t * mlp_ratio)) -> SiLU -> Dropout -> Linear(., d_s)``.
    """
    hidden = int(teacher_width * mlp_ratio)
    if hidden < 1:
        raise ValueError(
            f"mlp_ratio {mlp_ratio} gives a hidden width of {hidden} for teacher width {teacher_width}, "
            "so use a larger mlp_ratio"
        )
    return nn.Sequential(
        nn.LayerNorm(teacher_width),
        nn.Linear(teacher_width, hidden),
        nn.SiLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, student_width),
    )


def module_key(teacher_name: str) -> str:
    """Turn a teacher name into a valid ``nn.ModuleDict`` key, e.g. ``Qwen2.5-14B`` -> ``Qwen2_5-14B``.

    ModuleDict keys may not contain dots or shadow the dict's own attributes, so dots
    and other characters outside ``[A-Za-z0-9_-]`` become ``_``, and a key that equals
    a ModuleDict attribute name such as ``keys`` gets the prefix ``teacher_``.
    """
    key = re.sub(r"[^A-Za-z0-9_-]", "_", teacher_name)
    if not key or hasattr(nn.ModuleDict, key):
        key = f"teacher_{key}"
    return key


class TeacherKVAdapters(nn.Module):
    """Key and value adapters for one teacher, either shared by all student layers or one pair per layer."""

    def __init__(
        self,
        teacher_width: int,
        student_width: int,
        *,
        projector_type: str,
        mlp_ratio: float,
        dropout: float,
        num_copies: int | None,
    ) -> None:
        super().__init__()
        self.per_layer = num_copies is not None

        def build() -> nn.Module:
            if projector_type == "linear":
                return nn.Linear(teacher_width, student_width)
            return elastic_bottleneck(teacher_width, student_width, mlp_ratio, dropout)

        if num_copies is None:
            self.key_adapter: nn.Module = build()
            self.value_adapter: nn.Module = build()
        else:
            self.key_adapter = nn.ModuleList(build() for _ in range(num_copies))
            self.value_adapter = nn.ModuleList(build() for _ in range(num_copies))

    @staticmethod
    def _run_adapter(adapter: nn.Module, x: Tensor) -> Tensor:
        if isinstance(adapter, nn.ModuleList):
            return torch.stack([layer_adapter(x[:, i]) for i, layer_adapter in enumerate(adapter)], dim=1)
        return adapter(x)

    def forward(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        return self._run_adapter(self.key_adapter, keys), self._run_adapter(self.value_adapter, values)


class KVDimensionProjector(nn.Module):
    """Projector of teacher K/V ``[batch, L_t, tokens, d_t]`` to student K/V ``[batch, L_s, tokens, d_s]``.

    ``teacher_configs`` maps each teacher name to ``{"d_model": d_t, "num_layers": L_t}``.
    ``d_model`` is the teacher's KV width, not its hidden size. Without ``num_layers``
    the depth is taken from the first batch projected for that teacher and then stays
    fixed. Each teacher gets its own K and V adapters.

    ``student_num_layers`` sets L_s. When it is None the layer map is the identity, so
    L_s equals each teacher's L_t. ``projector_type`` is ``"elastic"`` (Elastic
    Bottleneck) or ``"linear"`` (one ``Linear(d_t, d_s)``, the ablation baseline).
    ``per_layer=True`` gives each student layer its own adapter pair and needs
    ``student_num_layers``. ``layer_map_seed`` seeds the ``random`` layer map only.

    Inputs of another dtype than the adapters, such as bf16 from the store, are cast to
    the adapters' dtype.
    """

    def __init__(
        self,
        teacher_configs: Mapping[str, Mapping[str, int]],
        student_d_model: int,
        mlp_ratio: float = 1.0,
        dropout: float = 0.1,
        *,
        student_num_layers: int | None = None,
        layer_map: str = "ratio",
        projector_type: str = "elastic",
        per_layer: bool = False,
        layer_map_seed: int = 0,
    ) -> None:
        super().__init__()
        if not teacher_configs:
            raise ValueError("teacher_configs is empty, but at least one teacher is required")
        self.student_d_model = _check_positive_int(student_d_model, "student_d_model")
        if student_num_layers is not None:
            _check_positive_int(student_num_layers, "student_num_layers")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if layer_map not in LAYER_MAPS:
            raise ValueError(f"unknown layer_map {layer_map!r}; valid kinds: {', '.join(LAYER_MAPS)}")
        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(
                f"unknown projector_type {projector_type!r}; valid types: {', '.join(PROJECTOR_TYPES)}"
            )
        if per_layer and student_num_layers is None:
            raise ValueError("per_layer=True needs student_num_layers to size one adapter pair per student layer")

        self.student_num_layers = student_num_layers
        self.layer_map = layer_map
        self.projector_type = projector_type
        self.per_layer = per_layer
        self.layer_map_seed = layer_map_seed
        self.mlp_ratio = mlp_ratio
        self.dropout = dropout

        self.teacher_widths: dict[str, int] = {}
        self.teacher_depths: dict[str, int | None] = {}
        self._keys: dict[str, str] = {}
        self.adapters = nn.ModuleDict()

        for name, config in teacher_configs.items():
            self._register_teacher(name, config)

    def _register_teacher(self, name: str, config: Mapping[str, int]) -> None:
        unknown = sorted(set(config) - set(TEACHER_CONFIG_KEYS))
        if unknown:
            raise ValueError(
                f"teacher {name!r} config has unknown keys {unknown}; accepted keys: {', '.join(TEACHER_CONFIG_KEYS)}"
            )
        if "d_model" not in config:
            raise ValueError(f"teacher {name!r} config is missing 'd_model' (the teacher's KV width)")
        width = _check_positive_int(config["d_model"], f"teacher {name!r} d_model")
        depth = config.get("num_layers")
        if depth is not None:
            depth = _check_positive_int(depth, f"teacher {name!r} num_layers")

        key = module_key(name)
        if key in self.adapters:
            clashing = next(other for other, other_key in self._keys.items() if other_key == key)
            raise ValueError(f"teacher names {clashing!r} and {name!r} both map to module key {key!r}, so rename one")

        self._keys[name] = key
        self.teacher_widths[name] = width
        self.teacher_depths[name] = depth
        self.adapters[key] = TeacherKVAdapters(
            width,
            self.student_d_model,
            projector_type=self.projector_type,
            mlp_ratio=self.mlp_ratio,
            dropout=self.dropout,
            num_copies=self.student_num_layers if self.per_layer else None,
        )
        if depth is not None:
            self._register_layer_map(name, depth)

    def _register_layer_map(self, name: str, teacher_depth: int, device: torch.device | None = None) -> None:
        if self.student_num_layers is None:
            matrix = torch.eye(teacher_depth)
        else:
            matrix = layer_map_matrix(
                self.student_num_layers, teacher_depth, self.layer_map, seed=self.layer_map_seed
            )
        if device is not None:
            matrix = matrix.to(device)
        # Not persistent: the map is rebuilt from the constructor arguments, so
        # checkpoints do not depend on it.
        self.register_buffer(f"layer_map_{self._keys[name]}", matrix, persistent=False)

    @property
    def teacher_names(self) -> list[str]:
        """Registered teacher names, in registration order."""
        return list(self._keys)

    def layer_map_for(self, teacher_name: str) -> Tensor | None:
        """Return the teacher's ``[L_s, L_t]`` layer map, or None before its depth is known."""
        key = self._key_for(teacher_name)
        return getattr(self, f"layer_map_{key}", None)

    def num_parameters(self, teacher_name: str | None = None) -> int:
        """Count the parameters of one teacher's adapters, or of all teachers when None."""
        module = self if teacher_name is None else self.adapters[self._key_for(teacher_name)]
        return sum(p.numel() for p in module.parameters())

    def _key_for(self, teacher_name: str) -> str:
        if teacher_name not in self._keys:
            raise KeyError(f"unknown teacher {teacher_name!r}; registered teachers: {', '.join(self._keys)}")
        return self._keys[teacher_name]

    def _check_input(self, teacher_name: str, name: str, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{name} must be [batch, teacher_layers, tokens, d_t], got shape {tuple(x.shape)}")
        width = self.teacher_widths[teacher_name]
        if x.shape[-1] != width:
            raise ValueError(f"{name} width {x.shape[-1]} does not match teacher {teacher_name!r} d_model {width}")
        depth = self.teacher_depths[teacher_name]
        if depth is not None and x.shape[1] != depth:
            raise ValueError(
                f"{name} has {x.shape[1]} layers but teacher {teacher_name!r} has num_layers {depth}"
            )

    def forward(self, teacher_name: str, teacher_k: Tensor, teacher_v: Tensor) -> tuple[Tensor, Tensor]:
        key = self._key_for(teacher_name)
        if teacher_k.shape != teacher_v.shape:
            raise ValueError(
                f"teacher_k and teacher_v shapes differ: {tuple(teacher_k.shape)} vs {tuple(teacher_v.shape)}"
            )
        self._check_input(teacher_name, "teacher_k", teacher_k)
        self._check_input(teacher_name, "teacher_v", teacher_v)

        if self.teacher_depths[teacher_name] is None:
            depth = teacher_k.shape[1]
            logger.info("teacher %r has no num_layers in its config; using %d from the input", teacher_name, depth)
            self.teacher_depths[teacher_name] = depth
            self._register_layer_map(teacher_name, depth, device=teacher_k.device)

        adapters = self.adapters[key]
        parameter = next(adapters.parameters())
        matrix = getattr(self, f"layer_map_{key}").to(parameter.dtype)
        mapped_k = torch.einsum("sl,blnd->bsnd", matrix, teacher_k.to(parameter.dtype))
        mapped_v = torch.einsum("sl,blnd->bsnd", matrix, teacher_v.to(parameter.dtype))
        return adapters(mapped_k, mapped_v)

    def project_teacher_kv(self, teacher_name: str, teacher_k: Tensor, teacher_v: Tensor) -> tuple[Tensor, Tensor]:
        """Project one teacher's K and V to the student's layers and width.

        Takes ``[batch, L_t, tokens, d_t]`` tensors and returns two
        ``[batch, L_s, tokens, d_s]`` tensors. Equivalent to calling the module.

        Raises:
            KeyError: for a teacher name that was never registered.
            ValueError: for a wrong rank, width or layer count, or K and V of different shapes.
        """
        return self(teacher_name, teacher_k, teacher_v)
