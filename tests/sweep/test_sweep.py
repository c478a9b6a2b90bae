"""compress sweep / search on tiny models: validation, shared work, equality with `compress run`,
resume after kill -9, the Ray executor, budgets and refinement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TEXT, tiny_model

from compress.errors import CompressError
from compress.pipeline import run_recipe
from compress.sweep import open_run, run_search, run_sweep
from compress.sweep.search import search
from compress.sweep.spec import load_sweep

TIMING = ("stage_wall_s", "eval_wall_s", "wall_s", "peak_memory_bytes")  # measurements of the process, not results


def base(model: Path, text: Path) -> dict:
    return {"model": str(model), "dtype": "float32", "device": "cpu",
            "calibration": {"path": str(text), "samples": 4, "seq_len": 16},
            "evaluate": {"perplexity": {"path": str(text), "seq_len": 32, "max_tokens": 256}, "fidelity": {"top_k": 8}}}


AXES = {"depth": ["none", {"bi1": {"layer_removal": {"metric": "bi", "remove": 1}}},
                  {"bi2": {"layer_removal": {"metric": "bi", "remove": 2}}}],
        "quant": ["none", {"gptq4": {"gptq": {"bits": 4, "group_size": 32}}}]}


def write_sweep(tmp_path: Path, model: Path, text: Path, name: str = "sweep", **extra) -> Path:
    body = {"base": base(model, text), "output": f"{name}-out", "axes": AXES, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def strip(row: dict) -> dict:
    """A row without timings and the checkpoint's place and size on disk (its compress.json names the
    recipe file and output folder, which differ; its tensors are compared on their own)."""
    return {k: v for k, v in row.items() if k not in (*TIMING, "disk_bytes") and not k.startswith("checkpoint")}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_tokenizer):
    """One local sweep (6 stacks, bi2+gptq4 and bi1 saved) and its folder, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("sweep")
    model = tmp / "tiny-llama"
    tiny_model("llama", 5).save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    text = tmp / "book.txt"
    text.write_text(TEXT * 40)
    path = write_sweep(tmp, model, text, save=["bi2+gptq4", "bi1"])
    calls = {"n": 0}
    import compress.stages.layer_removal as lr

    original = lr.score_layers

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    lr.score_layers = counting
    try:
        report = run_sweep(path, progress=False)
    finally:
        lr.score_layers = original
    return {"tmp": tmp, "model": model, "text": text, "path": path, "report": report, "score_calls": calls["n"],
            "out": tmp / "sweep-out"}


def test_cross_product_gives_every_stack_with_its_name(swept):
    names = [s.name for s in load_sweep(swept["path"]).stacks]
    assert names == ["baseline", "gptq4", "bi1", "bi1+gptq4", "bi2", "bi2+gptq4"]
    assert [r["step"] for r in swept["report"]["rows"]] == names and swept["report"]["complete"]


def test_each_stack_equals_compress_run_of_its_recipe(swept):
    """Rows identical except timings; the saved checkpoint's tensors identical."""
    sweep = load_sweep(swept["path"])
    for stack in ["bi2+gptq4", "bi1", "gptq4"]:
        variants = next(s.variants for s in sweep.stacks if s.name == stack)
        data = sweep.recipe_data(variants, stack in sweep.save)
        data["output"] = str(swept["tmp"] / "separate" / stack)
        recipe = swept["tmp"] / f"separate-{stack}.yaml"
        recipe.write_text(yaml.safe_dump(data))
        run_recipe(recipe, progress=False)
        alone = json.loads((swept["tmp"] / "separate" / stack / "report.json").read_text())
        swept_report = json.loads((swept["out"] / "runs" / stack / "report.json").read_text())
        for a, b in zip(swept_report["rows"], alone["rows"]):
            a, b = strip(a), strip(b)
            assert a == b, (stack, {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)})
        assert len(swept_report["rows"]) == len(alone["rows"])
        for kept in alone["rows"]:
            if kept.get("checkpoint"):
                a = load_file(swept["tmp"] / "separate" / stack / kept["checkpoint"] / "model.safetensors")
                b = load_file(swept["out"] / "runs" / stack / kept["checkpoint"] / "model.safetensors")
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stack


def test_shared_work_is_done_once(swept):
    out = swept["out"]
    # the layer scores of (model, calibration, bi): one scoring for remove 1 and remove 2
    assert swept["score_calls"] == 1
    events = [e for r in swept["report"]["nodes"].values() for e in r.get("cache", [])]
    scores = [e for e in events if e["what"] == "layer_scores"]
    assert [e["hit"] for e in scores] == [False, True]
    # the baseline evaluated once: every stack's baseline record is the root's file (hard link)
    root = (out / "runs" / "baseline" / "state" / "00-baseline.json").stat().st_ino
    for stack in ["gptq4", "bi1", "bi1+gptq4", "bi2", "bi2+gptq4"]:
        assert (out / "runs" / stack / "state" / "00-baseline.json").stat().st_ino == root, stack
    # bi2's pruning is reused by bi2+gptq4 (same record file), not redone
    assert (out / "runs" / "bi2+gptq4" / "state" / "01-layer_removal.json").stat().st_ino == \
        (out / "runs" / "bi2" / "state" / "01-layer_removal.json").stat().st_ino
    # the evaluation text tokenized once
    assert [e["hit"] for e in events if e["what"] == "eval_tokens"].count(False) == 1
    # checkpoints only where compress run writes them: bi1 saved; bi1+gptq4 has no copy of bi1's
    assert (out / "runs" / "bi1" / "checkpoints" / "layer_removal").is_dir()
    assert not (out / "runs" / "bi1+gptq4" / "checkpoints" / "layer_removal").exists()
    md = (out / "report.md").read_text()
    assert "## Shared work" in md and "plots/ppl_vs_weights.png" in md
    bi2_line = next(line for line in md.splitlines() if line.strip().startswith("- **bi2**"))
    assert "(stack)" in bi2_line and "layer_scores" in bi2_line.partition("reused:")[2]
    assert (out / "plots" / "kl_mean_vs_weights.png").is_file()


def test_rerun_is_a_no_op(swept):
    before = {p: p.stat().st_mtime_ns for p in (swept["out"] / "runs").rglob("state/*.json")}
    report = run_sweep(swept["path"], progress=False)
    assert all(r.get("done_before") for r in report["nodes"].values())
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_kill_9_resumes_only_what_is_missing(swept, tmp_path):
    """SIGKILL at the 3rd stage application (the sweep is mid-tree); the rerun finishes, with the
    same rows as the uninterrupted sweep, and leaves the nodes finished before untouched."""
    path = write_sweep(tmp_path, swept["model"], swept["text"], name="killed", save=["bi2+gptq4", "bi1"])
    env = {**os.environ, "COMPRESS_CRASH_AT": "stage:3", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    first = subprocess.run([sys.executable, "-m", "compress.cli", "sweep", str(path), "--no-progress"],
                           env=env, capture_output=True, text=True)
    assert first.returncode == -9, first.stderr[-2000:]
    out = tmp_path / "killed-out"
    finished = {p.name for p in (out / "nodes").glob("*.json")}
    assert finished and len(finished) < 6
    stamps = {p: p.stat().st_mtime_ns for n in finished for p in (out / "runs" / n[:-5] / "state").glob("*.json")}
    report = run_sweep(path, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [strip(r) for r in report["rows"]] == [strip(r) for r in swept["report"]["rows"]]
    assert {n for n, r in report["nodes"].items() if r.get("done_before")} == {n[:-5] for n in finished}


def test_search_budget_objective_and_pareto(swept):
    rows = swept["report"]["rows"]
    by = {r["step"]: r for r in rows}
    budget = by["bi1"]["weight_bytes"] / 2**20 + 1e-6
    result = run_search(swept["out"], [f"weight_mib<={budget}"], "ppl")
    fits = [r for r in rows if r["weight_bytes"] / 2**20 <= budget]
    assert result["best"] == min(fits, key=lambda r: r["ppl"])["step"]
    assert set(result["excluded"]) == {r["step"] for r in rows} - {r["step"] for r in fits}
    assert "baseline" in result["excluded"] and "needs <=" in result["excluded"]["baseline"]
    # the front: no stack beats a front member on both weight memory and perplexity
    for name in result["pareto"]:
        assert not any(o["weight_bytes"] <= by[name]["weight_bytes"] and o["ppl"] < by[name]["ppl"] for o in rows)
    assert json.loads((swept["out"] / "search.json").read_text())["best"] == result["best"]
    assert f"Best within the budget: {result['best']}" in (swept["out"] / "report.md").read_text()
    none = search(rows, ["weight_mib<=0.001"], "kl")
    assert none["best"] is None and "weight_mib" in none["why_none"]
    with pytest.raises(CompressError, match="--objective 'arc_easy'.*measured no lm-eval task"):
        search(rows, [], "arc_easy")
    with pytest.raises(CompressError, match="--budget 'weight_mib=300': write KEY<=N"):
        search(rows, ["weight_mib=300"], "ppl")
    with pytest.raises(CompressError, match="--budget speed: no stack has it; use one of .*weight_mib"):
        search(rows, ["speed>=3"], "ppl")


def test_refine_runs_the_neighbours_of_the_best(swept, tmp_path):
    body = {"base": base(swept["model"], swept["text"]), "output": "refine-out",
            "axes": {"depth": ["none", {"bi2": {"layer_removal": {"metric": "bi", "remove": 2}}}]}}
    path = tmp_path / "refine.yaml"
    path.write_text(yaml.safe_dump(body))
    run_sweep(path, progress=False)
    out = tmp_path / "refine-out"
    result = run_search(out, ["layers<=3"], "ppl", do_refine=True)
    assert (result["refined_from"], result["refined"]) == ("bi2", ["bi1", "bi3"])
    rows = {r["step"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert (rows["bi1"]["layers"], rows["bi3"]["layers"]) == (4, 2)
    assert result["best"] == min((rows["bi2"], rows["bi3"]), key=lambda r: r["ppl"])["step"]
    assert [s.name for s in open_run(out).stacks] == ["baseline", "bi2", "bi1", "bi3"]
    # the neighbours reused the root's baseline and the one scoring of the model
    assert (out / "runs" / "bi3" / "state" / "00-baseline.json").stat().st_ino == \
        (out / "runs" / "baseline" / "state" / "00-baseline.json").stat().st_ino
    nodes = json.loads((out / "report.json").read_text())["nodes"]
    assert [e["hit"] for e in nodes["bi3"]["cache"] if e["what"] == "layer_scores"] == [True]


def sweep_problems(path: Path, body: dict | None = None) -> str:
    """The message load_sweep refuses ``path`` with (written from ``body`` first, if given)."""
    if body is not None:
        path.write_text(yaml.safe_dump(body))
    with pytest.raises(CompressError) as e:
        load_sweep(path)
    return str(e.value)


def test_sweep_file_problems_are_listed_at_once(tmp_path, tiny_model_dir, text_file):
    body = {"base": {**base(tiny_model_dir, text_file), "stages": []}, "output": "o",
            "axes": {"depth": ["none", {"bad name": {"layer_removal": {"remove": 1}}},
                               {"bi9": {"layer_removal": {"remove": 9}}},
                               {"bix": {"layer_removal": {"remove": 1, "colour": "red"}}}],
                     "quant": ["none", {"bi9": {"gptq": {"bits": 4}}}]},
            "save": ["nope"], "colour": 1}
    path = tmp_path / "s.yaml"
    msg = sweep_problems(path, body)
    assert "colour: unknown key(s)" in msg
    assert "base.stages: the sweep sets stages, save, output" in msg
    assert "variant name 'bad name' must be" in msg
    assert "variant name 'bi9' used twice" in msg
    assert "save: nope not a stack" in msg
    del body["colour"], body["save"], body["base"]["stages"]
    body["axes"]["depth"].pop(1)
    body["axes"]["quant"] = ["none", {"q": {"gptq": {"bits": 4, "group_size": 32}}}]
    msg = sweep_problems(path, body)
    assert "stack bix: stages[0].layer_removal.colour" in msg and "stack bix+q: stages[0].layer_removal.colour" in msg
    body["axes"]["depth"].pop(2)
    msg = sweep_problems(path, body)  # against the model's shape: 5 layers
    assert "stack bi9: stages[0].layer_removal.remove: would remove 9 of 5 layers" in msg
    assert "stack bi9+q:" in msg


def test_explicit_stacks_and_their_errors(tmp_path, tiny_model_dir, text_file):
    path = write_sweep(tmp_path, tiny_model_dir, text_file, stacks=["baseline", "bi2+gptq4", ["gptq4"]])
    assert [s.name for s in load_sweep(path).stacks] == ["baseline", "bi2+gptq4", "gptq4"]
    msg = sweep_problems(write_sweep(tmp_path, tiny_model_dir, text_file, stacks=["gptq4+bi2", "bi1+bi2", "bi7"]))
    assert "stacks[0]: 'gptq4+bi2': at most one variant per axis, in axis order (depth -> quant)" in msg
    assert "stacks[1]: 'bi1+bi2': at most one variant per axis" in msg
    assert "stacks[2]: bi7 not a variant of any axis" in msg


def test_ray_missing_says_how_to_install(tmp_path, tiny_model_dir, text_file, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("no ray")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    path = write_sweep(tmp_path, tiny_model_dir, text_file, stacks=["baseline"])
    with pytest.raises(CompressError, match=r'--executor ray needs Ray, an optional extra: pip install -e "\.\[ray\]"'):
        run_sweep(path, executor="ray", progress=False)


def test_ray_executor_gives_the_local_results(swept, tmp_path):
    """A local Ray instance with the CI machine's 2 CPUs: the same stacks, the same rows (float
    tolerance: Ray's workers run torch with one thread each, so sums are ordered differently). Ray is
    a test dependency: no skip."""
    path = write_sweep(tmp_path, swept["model"], swept["text"], name="ray", save=["bi2+gptq4", "bi1"])
    report = run_sweep(path, executor="ray", num_cpus=2, progress=False)
    import ray

    assert not ray.is_initialized()  # shut down at the end
    local = {r["step"]: strip(r) for r in swept["report"]["rows"]}
    for row in report["rows"]:
        mine = strip(row)
        assert mine.keys() == local[row["step"]].keys()
        for key, value in mine.items():
            if isinstance(value, float):
                assert value == pytest.approx(local[row["step"]][key], rel=1e-4, abs=1e-6), (row["step"], key)
            else:
                assert value == local[row["step"]][key], (row["step"], key)
    assert sum(not e["hit"] for r in report["nodes"].values() for e in r.get("cache", [])
               if e["what"] == "layer_scores") == 1


def test_shipped_sweep_files_validate(assets):
    """recipes/sweeps/*.yaml: every stack's recipe valid; the offline one also against its model."""
    repo = Path(__file__).resolve().parents[2]
    quick = load_sweep(repo / "recipes" / "sweeps" / "quickstart-stacks.yaml")
    assert [s.name for s in quick.stacks] == ["baseline", "gptq4", "nf4", "bi7", "bi7+gptq4", "bi7+nf4"]
    big = load_sweep(repo / "recipes" / "sweeps" / "llama2-7b-stacks.yaml", check_model=False)
    assert len(big.stacks) == 21 and "bi9+heal+gptq4" in big.save
    assert big.recipe(("bi9", "heal", "gptq4"), True).save == ["gptq"]
