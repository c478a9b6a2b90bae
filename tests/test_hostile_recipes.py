"""Hostile recipe files (alias bombs, deep nesting, pipes, odd YAML values) end in one message
naming the file, never in a hang or a traceback, and never load a model."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from compress import recipe_text
from compress.cli import main
from compress.limits import MAX_COUNT, MAX_SAMPLES, MAX_SEED, MAX_SEQ_LEN, MAX_TOKENS
from compress.data.tokens import calibration_batches
from compress.errors import CompressError
from compress.recipe import load_recipe


@pytest.fixture(autouse=True)
def _no_model_load(no_model_load):
    """Every test here: a bad recipe must fail before any model loads."""


@pytest.fixture
def head(tiny_model_dir, text_file) -> str:
    """The valid start of a recipe; tests append (or replace) keys."""
    return (f"model: {tiny_model_dir}\noutput: out\n"
            f"calibration: {{path: {text_file}, samples: 4, seq_len: 16}}\n"
            "stages: [{layer_removal: {remove: 2}}]\n")


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(body)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(CompressError) as e:
        load_recipe(path)
    message = str(e.value)
    assert message.startswith(str(path)), message
    assert "Traceback" not in message and len(message) < 4000
    return message


def billion_laughs(levels: int = 9, fanout: int = 9) -> str:
    lines = ["a0: &a0 [lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


# --- 3d: alias bombs -------------------------------------------------------------------------

def test_alias_bomb_is_refused_before_anything_is_built(tmp_path, head, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the bomb reached the YAML constructor or pydantic")
    monkeypatch.setattr("compress.recipe_text.yaml.safe_load", never)
    monkeypatch.setattr("compress.recipe._Top.model_validate", never)
    path = write(tmp_path, head + "device_map:\n" + "".join(
        f"  {line}\n" for line in billion_laughs().splitlines()))
    message = error_of(path)
    assert message == (f"{path}: the recipe is too large: more than 100000 values once its *aliases are "
                       "expanded (too many aliases, or too many entries)")


def test_alias_bomb_through_the_cli_is_one_message(tmp_path, head):
    path = write(tmp_path, head + billion_laughs())
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1
    assert "the recipe is too large: more than 100000 values" in result.output
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit


def test_too_many_plain_entries_are_refused_too(tmp_path, head, monkeypatch):
    monkeypatch.setattr("compress.recipe_text.MAX_NODES", 40)  # the same rule, at a size a test can write
    path = write(tmp_path, head + "save: [" + ", ".join(["layer_removal"] * 40) + "]\n")
    assert error_of(path).endswith("the recipe is too large: more than 40 values once its *aliases are "
                                   "expanded (too many aliases, or too many entries)")
    monkeypatch.setattr("compress.recipe_text.MAX_NODES", 100)
    assert load_recipe(path).save == ["layer_removal"] * 40


def test_alias_used_inside_its_own_anchor_is_refused(tmp_path, head):
    path = write(tmp_path, head + "device_map: &loop {a: *loop}\n")
    assert error_of(path) == (f"{path}: the alias *loop is used inside its own anchor &loop; "
                              "a recipe cannot contain itself")


def test_aliases_that_build_deep_nesting_count_their_depth(tmp_path, head):
    chain = "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 120))
    path = write(tmp_path, head + chain)  # 120 short lines, but a0..a119 is a list 120 deep
    assert error_of(path) == f"{path}: the recipe is nested too deeply (max depth 100)"


def test_shared_nodes_are_expanded_once_and_stay_shared(monkeypatch):
    monkeypatch.setenv("HOSTILE_DIR", "/data")
    calls = []
    real = recipe_text.expand_string
    monkeypatch.setattr(recipe_text, "expand_string", lambda s, k, e: calls.append(k) or real(s, k, e))
    leaf = {"path": "${HOSTILE_DIR}/a.txt"}
    node = leaf
    for _ in range(9):  # 9 levels x 9 references: 9**9 leaves if every reference were copied
        node = [node] * 9
    errors: list[str] = []
    out = recipe_text.expand({"calibration": leaf, "bomb": node}, errors)
    assert errors == [] and calls == ["calibration.path"]
    assert out["calibration"] == {"path": "/data/a.txt"}
    deepest = out["bomb"]
    for _ in range(9):
        assert len(deepest) == 9 and all(x is deepest[0] for x in deepest)
        deepest = deepest[0]
    assert deepest is out["calibration"]


def test_legitimate_aliases_load_with_their_env_vars_expanded(tmp_path, tiny_model_dir, text_file,
                                                             monkeypatch):
    monkeypatch.setenv("HOSTILE_BOOKS", str(text_file.parent))
    path = write(tmp_path, f"model: {tiny_model_dir}\noutput: out\n"
                 "calibration: &books {path: '${HOSTILE_BOOKS}/book.txt', samples: 4, seq_len: 16}\n"
                 "stages: [{layer_merge: {remove: 1, calibration: *books}}]\n")
    r = load_recipe(path)
    assert r.calibration.path == str(text_file)
    assert r.stage("layer_merge").config.calibration.path == str(text_file)


# --- 3e: too deep, huge numbers ---------------------------------------------------------------

def test_5000_deep_nested_list_is_one_message(tmp_path, head):
    path = write(tmp_path, head + "device_map: " + "[" * 5000 + "]" * 5000 + "\n")
    assert error_of(path) == f"{path}: the recipe is nested too deeply (max depth 100)"


def test_3000_deep_nested_mapping_is_one_message(tmp_path, head):
    path = write(tmp_path, head + "device_map: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n")
    assert error_of(path) == f"{path}: the recipe is nested too deeply (max depth 100)"


def test_deep_block_style_nesting_is_one_message(tmp_path, head):
    path = write(tmp_path, head + "device_map:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 300)))
    assert error_of(path) == f"{path}: the recipe is nested too deeply (max depth 100)"


def test_nesting_up_to_the_limit_is_read(tmp_path):
    path = write(tmp_path, "a: " + "[" * 99 + "]" * 99 + "\n")  # the mapping + 99 lists = depth 100
    expected: list = []
    for _ in range(98):
        expected = [expected]
    assert recipe_text.read_yaml(path) == {"a": expected}
    write(tmp_path, "a: " + "[" * 100 + "]" * 100 + "\n")
    with pytest.raises(CompressError, match=r"nested too deeply \(max depth 100\)"):
        recipe_text.read_yaml(path)


def test_seed_beyond_what_torch_accepts_is_a_recipe_error(tmp_path, head):
    with pytest.raises((RuntimeError, ValueError, OverflowError)):  # why the bound exists
        torch.Generator().manual_seed(MAX_SEED + 1)
    for seed in (100000000000000000000000, -1):
        message = error_of(write(tmp_path, head.replace("seq_len: 16}", f"seq_len: 16, seed: {seed}}}")))
        assert ("calibration.seed: must be in 0..18446744073709551615 (2**64-1), the seeds "
                f"torch.Generator accepts (got {seed})") in message


def test_largest_seed_loads_and_seeds_torch(tmp_path, head):
    r = load_recipe(write(tmp_path, head.replace("seq_len: 16}", f"seq_len: 16, seed: {MAX_SEED}}}")))
    assert r.calibration.seed == 2**64 - 1
    batches = calibration_batches(torch.arange(100), 3, 8, r.calibration.seed, 1)
    assert len(batches) == 3 and batches[0]["input_ids"].shape == (1, 8)


def test_seed_written_1e23_is_a_string_and_says_so(tmp_path, head):
    message = error_of(write(tmp_path, head.replace("seq_len: 16}", "seq_len: 16, seed: 1e23}")))
    assert "calibration.seed: Input should be a valid integer (got '1e23')" in message


@pytest.mark.parametrize("key, where, bound", [
    ("samples", "calibration", MAX_SAMPLES), ("seq_len", "calibration", MAX_SEQ_LEN),
    ("batch_size", "calibration", MAX_COUNT), ("prompt_tokens", "evaluate.efficiency", MAX_SEQ_LEN),
    ("new_tokens", "evaluate.efficiency", MAX_SEQ_LEN), ("batch_size", "evaluate.efficiency", MAX_COUNT),
])
def test_counts_that_become_tensor_sizes_are_bounded(tmp_path, tiny_model_dir, text_file, key, where, bound):
    with pytest.raises((RuntimeError, TypeError, ValueError)):  # what torch does with such a size
        torch.randint(0, 5, (10**20,))
    huge = 10**20
    recipe = {"model": str(tiny_model_dir), "output": "out",
              "calibration": {"path": str(text_file), "samples": 4, "seq_len": 16},
              "stages": [{"layer_removal": {"remove": 2}}]}
    section = recipe["calibration"] if where == "calibration" else recipe.setdefault(
        "evaluate", {}).setdefault("efficiency", {})
    section[key] = huge
    message = error_of(write(tmp_path, yaml.safe_dump(recipe)))
    assert f"{where}.{key}: Input should be less than or equal to {bound} (got {huge})" in message
    section[key] = bound
    assert load_recipe(write(tmp_path, yaml.safe_dump(recipe))).path == tmp_path / "r.yaml"


def test_large_values_that_cannot_overflow_stay_allowed(tmp_path, head, text_file):
    body = head + f"evaluate: {{perplexity: {{path: {text_file}, max_tokens: {MAX_TOKENS}}}}}\n"
    assert load_recipe(write(tmp_path, body)).evaluate.perplexity.max_tokens == MAX_TOKENS == 2**40


def test_integer_of_5000_digits_is_one_message(tmp_path, head):
    message = error_of(write(tmp_path, head + "device_map: {a: " + "9" * 5000 + "}\n"))
    assert message == (f"{tmp_path / 'r.yaml'}: not valid YAML: a value cannot be read (Exceeds the limit "
                       "(4300 digits) for integer string conversion: value has 5000 digits); "
                       "quote it to keep it as text")


# --- 3g: ${VAR} expansion ---------------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({}, "x"), ({"HB": "b"}, "b"), ({"HA": "a"}, "a"), ({"HA": "a", "HB": "b"}, "a"),
    ({"HA": "", "HB": "b"}, "b"), ({"HA": "", "HB": ""}, "x"),
])
def test_nested_defaults_expand_inner_first(tmp_path, head, monkeypatch, env, expected):
    for name in ("HA", "HB"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    r = load_recipe(write(tmp_path, head.replace("output: out", "output: runs/${HA:-${HB:-x}}/end")))
    assert r.output == tmp_path / "runs" / expected / "end"


def test_expansion_keeps_text_around_references_and_does_not_reexpand_values(monkeypatch):
    monkeypatch.delenv("HA", raising=False)
    monkeypatch.setenv("HV", "${HA}")
    errors: list[str] = []
    text = "a}b${HA:-x}y} $HA ${HA:-$} ${HA:-}|${HV}"
    assert recipe_text.expand_string(text, "k", errors) == "a}bxy} $HA $ |${HA}"
    assert errors == []


def test_inner_unset_variable_is_an_error_only_when_its_default_is_used(monkeypatch):
    monkeypatch.delenv("HA", raising=False)
    monkeypatch.delenv("HB", raising=False)
    errors: list[str] = []
    recipe_text.expand_string("${HA:-${HB}}", "output", errors)
    assert errors == ["output: environment variable ${HB} is not set (set it, or write ${HB:-default})"]
    monkeypatch.setenv("HA", "set")
    errors.clear()
    assert recipe_text.expand_string("${HA:-${HB}}", "output", errors) == "set" and errors == []


@pytest.mark.parametrize("value, problem", [
    ("${HA:-x", "an unclosed ${"),
    ("${HA:-${HB:-x}", "an unclosed ${"),
    ("${1abc}", "a ${ not followed by a variable name"),
    ("${}", "a ${ not followed by a variable name"),
    ("pre/${", "a ${ not followed by a variable name"),
    ("${HA-x}", "${HA not followed by } or :-default}"),
    ("${HA:x}", "${HA not followed by } or :-default}"),
    ("${HA:-" * 25 + "x" + "}" * 25, "${...} nested more than 20 deep"),
])
def test_malformed_references_are_errors_naming_the_key(tmp_path, head, value, problem):
    message = error_of(write(tmp_path, head.replace("output: out", f"output: '{value}'")))
    shown = value if len(value) <= 80 else value[:77] + "..."
    assert (f"  - output: {problem} in {shown!r}; write ${{VAR}} or ${{VAR:-default}} "
            "(VAR: letters, digits and _, not starting with a digit)") in message
    assert not any(p.name.startswith("$") for p in tmp_path.iterdir())


# --- the file itself ----------------------------------------------------------------------------

def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    path = tmp_path / "r.yaml"
    os.mkfifo(path)
    assert error_of(path) == (f"{path}: is not a regular file (a pipe, device or socket); "
                              "give the recipe's .yaml file")


def test_link_to_dev_zero_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.symlink_to("/dev/zero")
    assert "is not a regular file (a pipe, device or socket)" in error_of(path)


def test_file_over_1_mib_is_refused(tmp_path, head):
    path = write(tmp_path, head + "# " + "x" * (1 << 20) + "\n")
    assert error_of(path) == (f"{path}: the recipe is larger than 1048576 bytes (1 MiB); "
                              "a recipe is a short YAML file")


def test_file_name_too_long_is_a_message(tmp_path):
    path = tmp_path / ("r" * 300 + ".yaml")
    assert error_of(path) == f"{path}: cannot read the recipe ([Errno 36] File name too long: '{path}')"


# --- odd YAML values and keys -------------------------------------------------------------------

@pytest.mark.parametrize("extra, fragment", [
    ("x: !!python/object/apply:os.system [ls]\n",
     "not valid YAML at line 5, column 4: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("x: 2001-13-45\n", "not valid YAML: a value cannot be read (month must be in 1..12)"),
    ("x: !!bool maybe\n", "not valid YAML: a value cannot be read (KeyError: 'maybe')"),
    ("x: !!timestamp soon\n", "not valid YAML: a value cannot be read (AttributeError: "),
    ("x: !!float abc\n", "not valid YAML: a value cannot be read (could not convert string to float: 'abc')"),
    ("? [a]\n: 1\n", "not valid YAML at line 5, column 3: found unhashable key"),
    ("device_map: {a: !!binary aGVsbG8=}\n", "device_map.a: Input should be a valid string (got b'hello')"),
    ("device_map: {a: !!set {x}}\n", "device_map.a: Input should be a valid integer (got {'x'})"),
    ("device_map: {a: 2001-12-14}\n",
     "device_map.a: Input should be a valid string (got datetime.date(2001, 12, 14))"),
    ("x: &a 1\ny: *b\n", "not valid YAML at line 6, column 4: found undefined alias 'b'"),
])
def test_odd_yaml_values_are_one_message(tmp_path, head, extra, fragment):
    assert fragment in error_of(write(tmp_path, head + extra))


def test_non_string_keys_are_named_as_keys(tmp_path, head):
    path = write(tmp_path, "{1: 2}\n")
    assert "  - 1: Keys should be strings (got 1)" in error_of(path)
    body = head.replace("stages: [{layer_removal: {remove: 2}}]",
                        "stages: [{null: {}}, {layer_removal: {remove: 2, 5: 3}}]")
    message = error_of(write(tmp_path, body))
    assert "  - stages[0]: unknown stage None; supported: [" in message
    assert "  - stages[1].layer_removal.5: Keys should be strings (got 5)" in message


def test_mixed_int_and_name_keys_in_max_memory_get_a_fingerprint(tmp_path, head):
    r = load_recipe(write(tmp_path, head + "device_map: auto\nmax_memory: {1: 2GiB, 0: 1GiB, cpu: 8GiB}\n"))
    assert r.max_memory == {1: "2GiB", 0: "1GiB", "cpu": "8GiB"}
    reordered = "device_map: auto\nmax_memory: {cpu: 8GiB, 0: 1GiB, 1: 2GiB}\n"
    again = load_recipe(write(tmp_path, head + reordered))
    assert r.fingerprint() == again.fingerprint()
    plain = load_recipe(write(tmp_path, head))  # all-string keys: the fingerprint json.dumps(sort_keys) gave
    before = hashlib.sha256(json.dumps(plain.raw, sort_keys=True).encode()).hexdigest()[:16]
    assert plain.fingerprint() == before


@pytest.mark.parametrize("key, value, reason", [
    ("output", '"a\\0b"', "embedded null byte"),
    ("output", "a" * 300, "File name too long"),
    ("model", "b" * 300, "File name too long"),
    ("model", '"./a\\0b"', "embedded null byte"),
    ("output", "~no_such_user_hostile/x", "Could not determine home directory."),
])
def test_paths_the_os_cannot_use_are_named(tmp_path, head, tiny_model_dir, key, value, reason):
    old = "output: out" if key == "output" else f"model: {tiny_model_dir}"
    message = error_of(write(tmp_path, head.replace(old, f"{key}: {value}")))
    shown = yaml.safe_load(value)
    shown = repr(shown) if len(repr(shown)) <= 80 else repr(shown)[:77] + "..."
    assert f"  - {key}: {shown} is not a usable path ({reason})" in message


def test_huge_values_are_shown_cut_and_problems_capped(tmp_path, head):
    message = error_of(write(tmp_path, head + "device: " + "x" * 100_000 + "\n"))
    assert message.endswith(f"  - device: '{'x' * 76}... is not one of auto, cpu, cuda, cuda:N, mps")
    many = ", ".join(f"k{i}: 1" for i in range(50))
    message = error_of(write(tmp_path, head.replace("{remove: 2}", f"{{remove: 2, {many}}}")))
    assert "(50 problem(s))" in message and "stages[0].layer_removal.k29: unknown key" in message
    assert "k30" not in message and message.endswith("\n  ... and 20 more")
