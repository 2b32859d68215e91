"""Tests for the embedded default: problems, tokenizer, and the tiny teacher and student."""

from __future__ import annotations

import ast
import importlib.util
import json
import operator
import re
import statistics
import sys
import unicodedata
from fractions import Fraction
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from extract import embedded
from extract.embedded import (
    BUILD_RECORD,
    EMBEDDED_NAME,
    EMBEDDED_STUDENT,
    EMBEDDED_TEACHER,
    SEEDS,
    build_embedded_model,
    embedded_problems_path,
    repo_data_dir,
    resolve_model_path,
)
from extract.errors import UserError

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
REAL_GSM8K_TEST = REPO / ".." / "shared" / "data" / "gsm8k" / "test.jsonl"
ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>=]+)>>(\S*)")
FINAL_LINE = re.compile(r"\n#### (\d+)$")


def load_script(name: str) -> ModuleType:
    """Import a script from data/, which is a folder of scripts, not a package."""
    spec = importlib.util.spec_from_file_location(f"embedded_{name}", DATA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolves string annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def exact_value(expression: str) -> Fraction:
    """Evaluate a calculator annotation independently of the generator's own evaluator."""
    operators = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def walk(node: ast.expr) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        assert isinstance(node, ast.BinOp) and type(node.op) in operators, f"unexpected syntax in {expression!r}"
        return operators[type(node.op)](walk(node.left), walk(node.right))

    return walk(ast.parse(expression, mode="eval").body)


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    return load_script("generate_problems")


@pytest.fixture(scope="module")
def tokenizer_script() -> ModuleType:
    return load_script("train_tokenizer")


@pytest.fixture(scope="module")
def all_rows() -> list[dict[str, str]]:
    return read_rows(DATA / "gsm8k-mini" / "train.jsonl") + read_rows(DATA / "gsm8k-mini" / "heldout.jsonl")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DATA / "tokenizer")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Both embedded models, built once for the module through resolve_model_path."""
    cache_dir = tmp_path_factory.mktemp("embedded-cache")
    return {
        "teacher": Path(resolve_model_path(EMBEDDED_TEACHER, cache_dir)),
        "student": Path(resolve_model_path(EMBEDDED_STUDENT, cache_dir)),
    }


# Problems


def test_generator_is_deterministic(generator):
    first = generator.build_splits()
    second = generator.build_splits()
    assert first == second


def test_generator_matches_committed_files(generator):
    for name, content in generator.build_splits().items():
        assert (DATA / "gsm8k-mini" / name).read_bytes() == content, f"{name} is stale"


def test_generator_check_mode(generator, tmp_path, capsys):
    assert generator.main(["--check"]) == 0
    assert generator.main(["--output-dir", str(tmp_path)]) == 0
    assert generator.main(["--check", "--output-dir", str(tmp_path)]) == 0

    (tmp_path / "heldout.jsonl").write_text("{}\n", encoding="utf-8")
    assert generator.main(["--check", "--output-dir", str(tmp_path)]) == 1
    assert "heldout.jsonl" in capsys.readouterr().out


def test_generator_has_many_templates(generator):
    assert len(generator.TEMPLATES) >= 15


def test_split_sizes_and_disjoint():
    train = read_rows(DATA / "gsm8k-mini" / "train.jsonl")
    heldout = read_rows(DATA / "gsm8k-mini" / "heldout.jsonl")
    assert len(train) == 400
    assert len(heldout) == 64
    assert len({row["question"] for row in train}) == len(train)
    assert not {row["question"] for row in train} & {row["question"] for row in heldout}


def test_annotations_evaluate_correctly(all_rows):
    for row in all_rows:
        answer = row["answer"]
        annotations = ANNOTATION.findall(answer)
        assert annotations, f"no calculator annotation in: {answer!r}"
        assert len(annotations) == answer.count("<<"), f"malformed annotation in: {answer!r}"
        for expression, written_value, shown_value in annotations:
            assert exact_value(expression) == int(written_value), f"wrong annotation {expression}={written_value}"
            assert shown_value.rstrip(".") == written_value, f"text after <<{expression}>> differs: {shown_value}"


def test_final_answer_is_last_step(all_rows):
    for row in all_rows:
        answer = row["answer"]
        final = FINAL_LINE.search(answer)
        assert final is not None, f"missing '#### <integer>' line: {answer!r}"
        last_value = ANNOTATION.findall(answer)[-1][1]
        assert final.group(1) == last_value


def test_answers_include_large_numbers(all_rows):
    finals = [int(FINAL_LINE.search(row["answer"]).group(1)) for row in all_rows]
    assert max(finals) >= 10_000
    assert all("," not in row["answer"].split("####")[1] for row in all_rows)


def test_every_step_is_a_whole_number(generator):
    solution = generator.Solution()
    with pytest.raises(ValueError, match="not a non-negative integer"):
        solution.calc("7/2")
    with pytest.raises(ValueError, match="not a non-negative integer"):
        solution.calc("2-3")


# Tokenizer


def test_tokenizer_training_is_deterministic(tokenizer_script, tmp_path):
    tokenizer_script.build(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (DATA / "tokenizer" / name).read_bytes(), f"{name} differs"


def test_tokenizer_check_mode(tokenizer_script):
    assert tokenizer_script.main(["--check"]) == 0


def test_tokenizer_settings(tokenizer, tokenizer_script):
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == tokenizer_script.MODEL_MAX_LENGTH
    assert tokenizer.unk_token is None
    assert 1_000 <= len(tokenizer) <= tokenizer_script.VOCAB_SIZE_LIMIT


def test_tokenizer_round_trips_real_gsm8k(tokenizer, tokenizer_script):
    if not REAL_GSM8K_TEST.is_file():
        pytest.skip(f"real GSM8K test file not found at {REAL_GSM8K_TEST}")
    rows = read_rows(REAL_GSM8K_TEST)[:50]
    for row in rows:
        text = tokenizer_script.TEXT_TEMPLATE.format(question=row["question"], answer=row["answer"])
        ids = tokenizer(text)["input_ids"]
        # The NFC normaliser is the only change a round trip may make.
        assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_tokenizer_encodes_any_unicode(tokenizer):
    text = "Größe 😀 東京 \t tab – dash"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_embedded_problem_token_lengths(tokenizer, tokenizer_script, all_rows):
    lengths = [
        len(tokenizer(tokenizer_script.TEXT_TEMPLATE.format(**row))["input_ids"]) for row in all_rows
    ]
    assert max(lengths) <= 200
    assert statistics.median(lengths) <= 160


# Models


def test_configs_match_tokenizer(tokenizer):
    for role in ("teacher", "student"):
        config = AutoConfig.from_pretrained(DATA / "models" / role)
        assert config.model_type == "qwen2"
        assert config.vocab_size == len(tokenizer)
        assert config.eos_token_id == tokenizer.eos_token_id
        assert config.pad_token_id == tokenizer.pad_token_id
        assert config.max_position_embeddings == 512
        assert config.rope_parameters["rope_theta"] == 1e6


def test_models_load_through_auto_classes(built):
    for role, path in built.items():
        model = AutoModelForCausalLM.from_pretrained(path)
        assert isinstance(model, Qwen2ForCausalLM)
        assert model.dtype == torch.float32
        assert AutoTokenizer.from_pretrained(path).eos_token == "<|endoftext|>"


def test_loaded_outputs_equal_built_model(built):
    input_ids = torch.randint(0, 1_000, (2, 24), generator=torch.Generator().manual_seed(0))
    for role, path in built.items():
        torch.manual_seed(SEEDS[role])
        fresh = Qwen2ForCausalLM(AutoConfig.from_pretrained(DATA / "models" / role)).eval()
        loaded = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            assert torch.equal(fresh(input_ids).logits, loaded(input_ids).logits), role


def test_build_is_deterministic(built, tmp_path):
    for role, path in built.items():
        rebuilt = build_embedded_model(role, tmp_path / role)
        first, second = load_file(path / "model.safetensors"), load_file(rebuilt / "model.safetensors")
        assert first.keys() == second.keys()
        for name in first:
            assert torch.equal(first[name], second[name]), f"{role} {name}"


def test_build_seed_changes_weights(built, tmp_path):
    rebuilt = build_embedded_model("student", tmp_path / "student", seed=SEEDS["student"] + 1)
    first = load_file(built["student"] / "model.safetensors")
    second = load_file(rebuilt / "model.safetensors")
    assert not torch.equal(first["model.embed_tokens.weight"], second["model.embed_tokens.weight"])


def test_build_keeps_caller_random_state(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_embedded_model("student", tmp_path / "student")
    assert torch.equal(torch.rand(3), expected)


def test_build_leaves_no_staging_dirs(built):
    cache_dir = built["teacher"].parent
    assert sorted(entry.name for entry in cache_dir.iterdir()) == ["student", "teacher"]


def test_tied_embeddings_and_rope_theta(built):
    teacher = AutoModelForCausalLM.from_pretrained(built["teacher"])
    student = AutoModelForCausalLM.from_pretrained(built["student"])
    assert teacher.config.tie_word_embeddings is False
    assert teacher.lm_head.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()
    assert student.config.tie_word_embeddings is True
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    for model in (teacher, student):
        assert model.config.rope_parameters["rope_theta"] == 1e6
        assert model.model.rotary_emb.inv_freq[1].item() == pytest.approx(1e6 ** (-2 / model.config.head_dim))


def test_kv_cache_shapes_differ(built):
    batch, tokens = 2, 7
    input_ids = torch.randint(0, 1_000, (batch, tokens), generator=torch.Generator().manual_seed(1))
    shapes = {}
    for role, path in built.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            output = model(input_ids, use_cache=True)
        # transformers 5.25 names the field `cache`; earlier 5.x releases `past_key_values`.
        cache = output["cache"] if "cache" in output else output["past_key_values"]
        config = model.config
        expected = (batch, config.num_key_value_heads, tokens, config.head_dim)
        assert len(cache.layers) == config.num_hidden_layers
        for layer in cache.layers:
            assert tuple(layer.keys.shape) == expected
            assert tuple(layer.values.shape) == expected
        shapes[role] = (len(cache.layers), *expected[1:])

    assert shapes["teacher"] == (6, 4, tokens, 32)
    assert shapes["student"] == (3, 2, tokens, 16)


# Name resolution and the build cache


def test_resolve_returns_other_names_unchanged(tmp_path):
    assert resolve_model_path("Qwen/Qwen2.5-1.5B", tmp_path) == "Qwen/Qwen2.5-1.5B"
    assert resolve_model_path("/models/local-checkpoint", tmp_path) == "/models/local-checkpoint"
    assert not any(tmp_path.iterdir())


def test_resolve_reuses_current_build(built):
    record = built["teacher"] / BUILD_RECORD
    before = record.stat().st_ino
    assert resolve_model_path(EMBEDDED_TEACHER, built["teacher"].parent) == str(built["teacher"])
    assert record.stat().st_ino == before


def test_resolve_rebuilds_stale_build(tmp_path):
    first = Path(resolve_model_path(EMBEDDED_STUDENT, tmp_path))
    record_path = first / BUILD_RECORD
    record = json.loads(record_path.read_text(encoding="utf-8"))
    record["config_sha256"] = "0" * 64
    record_path.write_text(json.dumps(record), encoding="utf-8")

    again = Path(resolve_model_path(EMBEDDED_STUDENT, tmp_path))
    assert again == first
    assert json.loads(record_path.read_text(encoding="utf-8"))["config_sha256"] != "0" * 64


def test_resolve_rebuilds_incomplete_build(tmp_path):
    model_dir = Path(resolve_model_path(EMBEDDED_STUDENT, tmp_path))
    (model_dir / "model.safetensors").unlink()
    assert Path(resolve_model_path(EMBEDDED_STUDENT, tmp_path)) == model_dir
    assert (model_dir / "model.safetensors").is_file()


def test_resolve_bare_name_needs_role(tmp_path):
    with pytest.raises(UserError, match="needs a role"):
        resolve_model_path(EMBEDDED_NAME, tmp_path)
    assert resolve_model_path(EMBEDDED_NAME, tmp_path, role="student") == str(tmp_path / "student")


def test_resolve_uses_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MERCATOR_CACHE_DIR", str(tmp_path))
    assert resolve_model_path(EMBEDDED_STUDENT) == str(tmp_path / "embedded" / "student")
    assert (tmp_path / "embedded" / "student" / "model.safetensors").is_file()


def test_missing_data_dir_is_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "_DATA_DIR", tmp_path / "data")
    with pytest.raises(UserError, match="source checkout"):
        repo_data_dir()


def test_problem_paths(tmp_path):
    assert embedded_problems_path("train") == DATA / "gsm8k-mini" / "train.jsonl"
    assert embedded_problems_path("heldout").is_file()
    with pytest.raises(UserError, match="invalid embedded split"):
        embedded_problems_path("test")
