"""Reliability: fuzzed bad recipes fail fast and clearly; killed runs resume to the same result."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.cli import main
from compress.errors import CompressError
from compress.recipe import load_recipe

# key path -> values that are always wrong there
BAD_VALUES = {
    ("model",): [3, [], {}, None, "no such/model/at all", "./missing-folder"],
    ("dtype",): ["float64", "fp16", 16, None],
    ("device",): ["tpu", "cuda:x", 0, []],
    ("output",): [None, 5, []],
    ("trust_remote_code",): ["yes", 1, None],
    ("calibration",): ["pg19", 7, []],
    ("calibration", "samples"): [0, -5, "many", 1.5, None, []],
    ("calibration", "seq_len"): [1, 0, "long", {}],
    ("calibration", "path"): ["missing.txt", 3, []],
    ("calibration", "batch_size"): [0, -1, "x"],
    ("evaluate",): ["all", 1],
    ("evaluate", "after"): ["baseline", ["later"], [1]],
    ("evaluate", "perplexity", "seq_len"): [0, "x", -3],
    ("evaluate", "perplexity", "stride"): [0, 10_000, "x"],
    ("evaluate", "perplexity", "max_tokens"): [1, -1, "x"],
    ("stages",): [[], "layer_removal", {}, None, [None], [[]], ["layer_removal"],
                  [{"prune_heads": {}}], [{"layer_removal": 3}], [{"a": {}, "b": {}}]],
    ("stages", 0, "layer_removal", "remove"): [0, -3, "nine", 2.5, []],
    ("stages", 0, "layer_removal", "fraction"): [0.0, 1.0, 1.5, -0.1, "x"],
    ("stages", 0, "layer_removal", "metric"): ["magic", 3, ["bi"]],
    ("stages", 0, "layer_removal", "layers"): [[], "1,2", [-1], ["a"]],
    ("save",): ["layer_removal", ["nope"], [3]],
}
NESTS = [(), ("calibration",), ("evaluate",), ("evaluate", "perplexity"), ("stages", 0, "layer_removal")]


def base_recipe(model_dir: Path, text: Path) -> dict:
    return {
        "model": str(model_dir), "dtype": "float32", "device": "cpu", "output": "out",
        "calibration": {"path": str(text), "samples": 4, "seq_len": 16},
        "evaluate": {"after": ["baseline", "every_stage"],
                     "perplexity": {"path": str(text), "seq_len": 32, "max_tokens": 256}},
        "stages": [{"layer_removal": {"metric": "bi", "remove": 2}}],
        "save": ["layer_removal"],
    }


def set_path(recipe: dict, path: tuple, value) -> None:
    node = recipe
    for key in path[:-1]:
        node = node[key]
    if path[-1:] in (("remove",), ("fraction",), ("layers",)):  # keep exactly one amount key
        for k in ("remove", "fraction", "layers"):
            node.pop(k, None)
    node[path[-1]] = value


def remove_path(recipe: dict, path: tuple) -> None:
    node = recipe
    for key in path[:-1]:
        node = node[key]
    node.pop(path[-1], None)


mutation = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(sorted(BAD_VALUES, key=str))).flatmap(
        lambda t: st.tuples(st.just("set"), st.just(t[1]), st.sampled_from(BAD_VALUES[t[1]]))),
    st.tuples(st.just("unknown_key"), st.sampled_from(NESTS),
              st.text("abcdefghijklmnopqrstuvwxyz_", min_size=2, max_size=12)),
    st.tuples(st.just("missing"), st.sampled_from([("model",), ("output",), ("stages",)]), st.none()),
)
raw_text = st.sampled_from(["", "   \n", "model: [unclosed", "- a\n- b", "42", "model: x\n  bad: indent",
                            "stages: {layer_removal: {remove: 2}", "\t- tab", "null", "!!python/object:os.system x"])


def apply(recipe: dict, mutations) -> dict:
    """Apply mutations in order; a later one whose path an earlier one destroyed is skipped (the
    first always applies to the intact base, so the result is always malformed)."""
    recipe = copy.deepcopy(recipe)
    for kind, path, value in mutations:
        try:
            if kind == "set":
                set_path(recipe, path, value)
            elif kind == "unknown_key":
                node = recipe
                for key in path:
                    node = node[key]
                node[f"zz_{value}"] = 1
            else:
                remove_path(recipe, path)
        except (KeyError, IndexError, TypeError, AttributeError):
            continue
    return recipe


FUZZED: set[str] = set()


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(mutations=st.lists(mutation, min_size=1, max_size=3), text=st.one_of(st.none(), raw_text))
def test_fuzzed_bad_recipes_fail_with_a_clear_message(tiny_model_dir, text_file, tmp_path_factory,
                                                      no_model_load, mutations, text):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "recipe.yaml"
    body = text if text is not None else yaml.safe_dump(apply(base_recipe(tiny_model_dir, text_file), mutations))
    path.write_text(body)
    FUZZED.add(body)
    with pytest.raises(CompressError) as e:
        load_recipe(path)
    message = str(e.value)
    assert message.startswith(str(path)), message
    assert "Traceback" not in message and len(message) < 4000


def test_at_least_200_distinct_bad_recipes_were_fuzzed():
    assert len(FUZZED) >= 200, len(FUZZED)


@pytest.mark.parametrize("args, expected", [
    (["run", "missing.yaml"], "recipe file not found"),
    (["run", "."], "is a directory; give the recipe's .yaml file"),
    (["validate", "missing.yaml"], "recipe file not found"),
    (["inspect", "/nonexistent/ckpt"], "no compress.json"),
    (["score", "/nonexistent/model", "--metric", "sequential"], "local model folder /nonexistent/model does not exist"),
    (["score", "MODEL_DIR", "--metric", "magic"], "--metric: unknown metric 'magic'"),
    (["score", "MODEL_DIR", "--metric", "bi"], "give exactly one of --data (local text) or --dataset"),
    (["score", "NOT_A_MODEL", "--metric", "sequential"], "holds no config.json"),
    (["score", "BAD_JSON", "--metric", "sequential"], "cannot read its config"),
    (["score", "BAD_WEIGHTS", "--metric", "sequential"], "cannot load its weights"),
    (["score", "PICKLE_ONLY", "--metric", "sequential"], "pass --allow-pickle-weights"),
])
def test_cli_commands_with_bad_arguments(args, expected, tiny_model_dir, tmp_path):
    folders = {"MODEL_DIR": tiny_model_dir, "NOT_A_MODEL": tmp_path / "empty", "BAD_JSON": tmp_path / "badjson",
               "BAD_WEIGHTS": tmp_path / "badweights", "PICKLE_ONLY": tmp_path / "pickle"}
    (tmp_path / "empty").mkdir()
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson/config.json").write_text('{"model_type": "llama",')
    for name, damage in (("badweights", "truncate"), ("pickle", "bin")):
        d = tmp_path / name
        subprocess.run(["cp", "-r", str(tiny_model_dir), str(d)], check=True)
        st_file = d / "model.safetensors"
        if damage == "truncate":
            st_file.write_bytes(st_file.read_bytes()[:1000])
        else:
            st_file.unlink()
            (d / "pytorch_model.bin").write_bytes(b"not a pickle")
    args = [str(folders.get(a, a)) for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert expected in result.output, result.output
    assert "Traceback" not in result.output


# ---- crash and resume ------------------------------------------------------------------------

def run_cli(recipe: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "compress.cli", "run", str(recipe), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)


def tensor_hashes(ckpt: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
            for k, v in sorted(load_file(ckpt / "model.safetensors").items())}


@pytest.fixture
def crash_recipe(tmp_path, tiny_model_dir, text_file) -> Path:
    body = base_recipe(tiny_model_dir, text_file)
    body["stages"] = [{"layer_removal": {"metric": "bi", "remove": 1}},
                      {"layer_removal": {"metric": "angular", "remove": 1}}]
    body["save"] = ["layer_removal", "layer_removal_2"]
    p = tmp_path / "crash.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


@pytest.fixture
def reference_run(crash_recipe, tmp_path) -> dict:
    ref = crash_recipe.with_name("reference.yaml")
    ref.write_text(crash_recipe.read_text().replace("output: out", "output: reference"))
    assert run_cli(ref).returncode == 0
    folder = tmp_path / "reference"
    return {"rows": json.loads((folder / "report.json").read_text())["rows"],
            "hashes": {s: tensor_hashes(folder / "checkpoints" / s) for s in ("layer_removal", "layer_removal_2")}}


@pytest.mark.slow
@pytest.mark.parametrize("point", ["scoring", "stage", "evaluation:2", "checkpoint"])
def test_sigkill_then_rerun_resumes_to_the_same_result(point, crash_recipe, reference_run, tmp_path):
    crashed = run_cli(crash_recipe, {"COMPRESS_CRASH_AT": point})
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    out = tmp_path / "out"
    for ckpt in out.glob("checkpoints/*"):  # under a final name, a checkpoint is always complete
        assert ckpt.name.startswith(".") or (ckpt / "compress.json").exists()
    resumed = run_cli(crash_recipe)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resume: baseline evaluation already done" in resumed.stderr
    if point in ("evaluation:2", "checkpoint"):
        assert "resume: stage layer_removal already done; replaying its record" in resumed.stderr
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["ppl"] for r in rows] == [r["ppl"] for r in reference_run["rows"]]
    assert [r["layers"] for r in rows] == [5, 4, 3]
    for stage, hashes in reference_run["hashes"].items():
        assert tensor_hashes(out / "checkpoints" / stage) == hashes
    assert not list(out.glob("checkpoints/.*"))


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(crash_recipe):
    result = run_cli(crash_recipe, {"COMPRESS_CRASH_AT": "scoring", "COMPRESS_CRASH_SIGNAL": "INT"})
    assert result.returncode == 130
    assert "interrupted: finished steps are kept; run the same command again to resume" in result.stderr
    assert "Traceback" not in result.stderr
