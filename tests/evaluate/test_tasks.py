"""evaluate.tasks / `compress eval --tasks`: lm-eval's own task code on the in-memory model gives
exactly the numbers lm-eval gives on a saved copy of it; offline, with a local task YAML + JSONL."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from compress.errors import CompressError
from compress.evaluate.tasks import TasksConfig, run_tasks, task_manager
from conftest import REPO, tiny_model

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is part of the test extra: pip install -e '.[test]'")
TASK = "compress_toy_mc"
WORDS = "truth universally acknowledged single man possession good fortune must want wife".split()
KEYS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


def write_task(folder: Path, docs: int = 10, name: str = TASK, **extra) -> Path:
    """A multiple-choice lm-eval task (acc and acc_norm) on local JSONL: the task YAML users write."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question": " ".join(rng.choice(WORDS) for _ in range(6)),
             "choices": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(4)],
             "label": rng.randrange(4)} for _ in range(docs)]
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "fewshot_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}", "doc_to_target": "label",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        **extra}))
    return folder


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def reference(tasks_dir, offline):
    """lm-eval on its own: its CLI's path (model name -> its HFLM loads the saved folder)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)  # the built-ins take seconds

    def run(model_dir: Path, num_fewshot: int | None, limit: int | None, batch_size: int = 4) -> dict:
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32",
                                      tasks=[TASK], num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                                      device="cpu", task_manager=manager, log_samples=False)
        return out["results"][TASK]
    return run


@pytest.fixture(scope="module")
def manager(tasks_dir):
    found = task_manager(TasksConfig(names=[TASK], include_path=str(tasks_dir)))
    assert found.all_tasks == [TASK]  # only the local folder was indexed: all names are there
    return found


def ours(row: dict) -> dict:
    return {k: row[f"tasks.{TASK}.{k}"] for k in KEYS}


def theirs(result: dict) -> dict:
    return {k: result[f"{k},none"] for k in KEYS}


def test_in_memory_model_gives_lm_evals_numbers_exactly(tiny_model_dir, tiny_tokenizer, tasks_dir, manager,
                                                        reference, caplog):
    num_fewshot, limit = 2, 7
    cfg = TasksConfig(names=[TASK], num_fewshot=num_fewshot, limit=limit, batch_size=4, include_path=str(tasks_dir))
    model = tiny_model("llama", 5)  # the weights tiny_model_dir holds, built in memory here
    rng = torch.get_rng_state()
    with caplog.at_level(logging.INFO):
        row = run_tasks(model, tiny_tokenizer, cfg, manager, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # lm-eval's seeding is undone
    messages = [r.getMessage() for r in caplog.records]
    assert f"lm-eval 0.4.13: {TASK} on cpu (batch 4, {num_fewshot}-shot, limit {limit})" in messages
    assert not [r for r in caplog.records if r.name.startswith("lm_eval")]  # its log stays out of ours
    ref = reference(tiny_model_dir, num_fewshot, limit)
    assert ours(row) == theirs(ref)  # exact: same code, same model
    assert 0 < row[f"tasks.{TASK}.acc"] < 1 and row[f"tasks.{TASK}.samples"] == limit
    assert row[f"tasks.{TASK}.num_fewshot"] == num_fewshot


def test_pipeline_rows_equal_lm_eval_on_each_saved_checkpoint(tmp_path, tiny_model_dir, tasks_dir, reference,
                                                               offline):
    """Pruned and bnb4-quantized models, evaluated in memory during the run."""
    pytest.importorskip("bitsandbytes")
    from compress.compare import compare_runs
    from compress.pipeline import run_recipe

    body = {"model": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "output": "run",
            "evaluate": {"tasks": {"names": [TASK], "include_path": str(tasks_dir), "batch_size": 4}},
            "stages": [{"layer_removal": {"layers": [1]}}, {"bnb4": {"quant_type": "nf4"}}],
            "save": ["layer_removal", "bnb4"]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    report = run_recipe(tmp_path / "r.yaml", progress=False)
    rows = {r["step"]: r for r in report["rows"]}
    assert ours(rows["baseline"]) == theirs(reference(tiny_model_dir, None, None))
    for stage in ("layer_removal", "bnb4"):
        assert ours(rows[stage]) == theirs(reference(tmp_path / "run/checkpoints" / stage, None, None)), stage
    assert ours(rows["layer_removal"]) != ours(rows["baseline"])  # the pruned model is another model
    md = (tmp_path / "run/report.md").read_text()
    acc, err = rows["baseline"][f"tasks.{TASK}.acc"], rows["baseline"][f"tasks.{TASK}.acc_stderr"]
    assert f"| {TASK} acc | {TASK} acc_norm |" in md and f"{acc:.3f} ±{err:.3f}" in md
    assert f"plots/task_{TASK}_acc_norm_vs_weights.png" in md
    table = compare_runs([tmp_path / "run"], tmp_path / "cmp")
    delta = 100 * (rows["bnb4"][f"tasks.{TASK}.acc"] - acc) / acc
    assert f"{rows['bnb4'][f'tasks.{TASK}.acc']:.3f} ±{rows['bnb4'][f'tasks.{TASK}.acc_stderr']:.3f} ({delta:+.1f}%)" in table
    assert (tmp_path / f"cmp/task_{TASK}_acc_vs_weights.png").stat().st_size > 0


def test_gptq_model_in_memory_equals_lm_eval_on_its_checkpoint(tmp_path, tiny_model_dir, text_file, tasks_dir,
                                                               reference, offline):
    pytest.importorskip("gptqmodel")
    from compress.pipeline import run_recipe

    body = {"model": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "output": "run",
            "calibration": {"path": str(text_file), "samples": 4, "seq_len": 32},
            "evaluate": {"after": ["gptq"], "tasks": {"names": [TASK], "include_path": str(tasks_dir),
                                                      "batch_size": 4, "limit": 8}},
            "stages": [{"gptq": {"bits": 4, "group_size": 32}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    row = run_recipe(tmp_path / "r.yaml", progress=False)["rows"][1]
    assert ours(row) == theirs(reference(tmp_path / "run/checkpoints/gptq", None, 8))


def test_cli_eval_tasks_offline_writes_lm_evals_numbers(tmp_path, tiny_model_dir, tasks_dir, reference):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "compress.cli", "eval", str(tiny_model_dir), "--tasks", TASK, "--include-path",
           str(tasks_dir), "--num-fewshot", "1", "--limit", "7", "--tasks-batch-size", "4", "--device", "cpu",
           "--dtype", "float32", "--out", str(tmp_path / "row.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "row.json").read_text())
    assert ours(row) == theirs(reference(tiny_model_dir, 1, 7))
    assert f"{TASK} acc" in proc.stdout and "Running loglikelihood requests" in proc.stderr  # lm-eval's progress
    assert f"compress: lm-eval 0.4.13: {TASK} on cpu" in proc.stderr
    assert "lm_eval" not in proc.stderr and "pretrained` model kwarg" not in proc.stderr


def test_a_group_reports_its_aggregate_or_its_tasks_and_a_tag_its_tasks(tmp_path, tiny_tokenizer, offline):
    folder = tmp_path / "mine"
    for name in ("ta", "tb", "tc", "td"):
        write_task(folder, name=name)
    for name in ("te", "tf"):
        write_task(folder, name=name, tag="tg")
    (folder / "groups.yaml").write_text(yaml.safe_dump(
        {"group": "gagg", "task": ["ta", "tb"], "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean"}]}))
    (folder / "plain.yaml").write_text(yaml.safe_dump({"group": "gplain", "task": ["tc", "td"]}))
    cfg = TasksConfig(names=["gagg", "gplain", "tg"], limit=2, include_path=str(folder))
    row = run_tasks(tiny_model("llama", 2), tiny_tokenizer, cfg, task_manager(cfg), progress=False)
    assert sorted({key.split(".")[1] for key in row}) == ["gagg", "tc", "td", "te", "tf"]
    # every task reads the same documents: the group's mean of ta and tb is their (common) accuracy
    assert row["tasks.gagg.acc"] == pytest.approx(row["tasks.tc.acc"]) and row["tasks.tc.acc"] == row["tasks.te.acc"]
    assert "tasks.gagg.acc_norm" not in row and row["tasks.tc.samples"] == 2


def test_unknown_task_names_say_which_and_how_to_find_valid_ones(tmp_path, tiny_model_dir, tasks_dir, no_model_load):
    from click.testing import CliRunner

    from compress.cli import main

    body = {"model": str(tiny_model_dir), "output": "run", "stages": [{"layer_removal": {"layers": [0]}}],
            "evaluate": {"tasks": {"names": [TASK, "arc_easyy"], "include_path": str(tasks_dir)}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output == (
        "Error: evaluate.tasks.names: unknown lm-eval task(s) 'arc_easyy' (did you mean arc_easy, arc_eu_easy, "
        f"arc_es?): not among lm-eval 0.4.13's tasks or in {tasks_dir}. `lm-eval ls tasks` lists the built-in "
        "names; your own task YAML files go in a folder given as evaluate.tasks.include_path (compress eval "
        "--include-path) (lm-eval skips a YAML file it cannot parse)\n")


def test_a_layerwise_run_with_tasks_stops_before_loading_weights(tmp_path, tiny_model_dir, no_model_load,
                                                                  monkeypatch):
    from compress.pipeline import Pipeline, run_recipe

    monkeypatch.setattr(Pipeline, "choose_layerwise", lambda self: True)  # as if the weights did not fit
    body = {"model": str(tiny_model_dir), "output": "run", "stages": [{"layer_removal": {"layers": [0]}}],
            "evaluate": {"tasks": {"names": ["arc_easy"]}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    with pytest.raises(CompressError, match=r"evaluate.tasks: the weights do not fit \w+, so this would be a "
                                            r"layer-wise run, and lm-eval runs the whole model on one device"):
        run_recipe(tmp_path / "r.yaml", progress=False)
    assert not (tmp_path / "run").exists()


def test_without_lm_eval_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(CompressError, match=r'^lm-eval tasks need lm-evaluation-harness: pip install -e "\.\[tasks\]"'):
        task_manager(TasksConfig(names=["arc_easy"]))


def test_lm_eval_is_imported_only_when_tasks_are_asked_for():
    code = "import sys, compress.cli, compress.pipeline, compress.compare; print('lm_eval' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"
