"""Run folders: a run never deletes or changes its inputs, whatever `output` and --overwrite say;
it resumes only the same recipe on the same model files; one run holds a folder at a time."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compress.cli import main
from compress.errors import CompressError
from compress.model_io import content_hash, replace_dir
from compress.pipeline import run_recipe
from compress.recipe import load_recipe
from compress.run_folder import hold_run_lock
from conftest import crash_perplexity_at, restore_perplexity, tiny_model


def tree_hash(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_recipe(path: Path, model: Path, text: Path, output: str, **extra) -> Path:
    body = {
        "model": str(model), "dtype": "float32", "device": "cpu", "output": output,
        "calibration": {"path": str(text), "samples": 4, "seq_len": 16},
        "evaluate": {"perplexity": {"path": str(text), "seq_len": 32, "max_tokens": 256}},
        "stages": [{"layer_removal": {"metric": "bi", "remove": 2}}], **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture
def workspace(tmp_path, tiny_model_dir, text_file) -> dict[str, Path]:
    """A user's project folder: recipe, model and book side by side, plus a notes file."""
    root = tmp_path / "project"
    root.mkdir()
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    book = root / "book.txt"
    shutil.copy(text_file, book)
    (root / "notes.txt").write_text("my notes")
    return {"root": root, "model": model, "book": book}


@pytest.mark.parametrize("output, expected", [
    (".", "is the recipe's own folder"),
    ("..", "contains the recipe's own folder"),
    ("/", "contains the recipe's own folder"),
    ("model", "is the input model folder"),
    ("model/run", "is inside the input model folder"),
    ("book.txt", "is the calibration.path"),
])
def test_output_that_would_touch_an_input_is_refused_before_anything_runs(workspace, output, expected,
                                                                          monkeypatch):
    recipe = write_recipe(workspace["root"] / "recipe.yaml", workspace["model"], workspace["book"], output)
    before = tree_hash(workspace["root"])
    monkeypatch.setattr("compress.pipeline.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    for command in (["run", str(recipe), "--overwrite", "--no-progress"], ["validate", str(recipe)]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1, result.output
        assert expected in result.output and "Traceback" not in result.output
    assert tree_hash(workspace["root"]) == before


def test_output_that_contains_the_model_is_refused(workspace):
    recipe = write_recipe(workspace["root"] / "recipes" / "r.yaml", workspace["model"], workspace["book"],
                          str(workspace["root"]))
    with pytest.raises(CompressError, match="contains the input model folder"):
        load_recipe(recipe)


def test_output_that_contains_a_data_folder_is_refused(workspace):
    books = workspace["root"] / "data" / "books"
    books.mkdir(parents=True)
    shutil.copy(workspace["book"], books / "a.txt")
    recipe = write_recipe(workspace["root"] / "recipes" / "r.yaml", workspace["model"], books,
                          str(workspace["root"] / "data"))
    with pytest.raises(CompressError, match=r"contains the calibration.path .*books"):
        load_recipe(recipe)


def test_overwrite_never_deletes_a_folder_compress_did_not_write(workspace):
    out = workspace["root"] / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    recipe = write_recipe(workspace["root"] / "recipe.yaml", workspace["model"], workspace["book"], "out")
    for overwrite in (False, True):
        with pytest.raises(CompressError, match=r"holds files that compress did not write \(precious.txt\); "
                                                "compress never deletes those, even with --overwrite"):
            run_recipe(recipe, overwrite=overwrite, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    assert not (workspace["root"] / ".out.new").exists()


def test_overwrite_replaces_another_recipes_run_only_once_complete(workspace):
    first = write_recipe(workspace["root"] / "a.yaml", workspace["model"], workspace["book"], "out")
    run_recipe(first, progress=False)
    second = write_recipe(workspace["root"] / "b.yaml", workspace["model"], workspace["book"], "out",
                          save=["layer_removal"])
    (workspace["root"] / "b.yaml").write_text((workspace["root"] / "b.yaml").read_text()
                                              .replace("remove: 2", "remove: 1"))
    with pytest.raises(CompressError, match="holds a run of another recipe"):
        run_recipe(second, progress=False)
    report = run_recipe(second, overwrite=True, progress=False)
    assert [r["layers"] for r in report["rows"]] == [5, 4]
    assert not (workspace["root"] / ".out.new").exists() and not (workspace["root"] / ".old-out").exists()


def test_resume_is_refused_after_the_input_model_changed(workspace, monkeypatch):
    recipe = write_recipe(workspace["root"] / "recipe.yaml", workspace["model"], workspace["book"], "out")
    crash_perplexity_at(monkeypatch, 2)  # baseline evaluated, then a crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(recipe, progress=False)
    restore_perplexity(monkeypatch)
    report_md = (workspace["root"] / "out" / "report.md")
    assert not report_md.exists() or "Incomplete" in report_md.read_text()

    tiny_model("llama", 5, seed=7).save_pretrained(workspace["model"])  # the user retrains in place
    with pytest.raises(CompressError, match="holds a run of this recipe on other model files .* the input "
                                            "model changed since, so its results cannot be resumed"):
        run_recipe(recipe, progress=False)
    fresh = run_recipe(recipe, overwrite=True, progress=False)
    independent = write_recipe(workspace["root"] / "c.yaml", workspace["model"], workspace["book"], "other")
    assert [r["ppl"] for r in fresh["rows"]] == [r["ppl"] for r in run_recipe(independent, progress=False)["rows"]]


def test_finished_run_is_not_returned_again_for_changed_model_files(workspace):
    recipe = write_recipe(workspace["root"] / "recipe.yaml", workspace["model"], workspace["book"], "out")
    first = run_recipe(recipe, progress=False)
    assert run_recipe(recipe, progress=False)["rows"] == first["rows"]  # unchanged model: resumes
    tiny_model("llama", 5, seed=3).save_pretrained(workspace["model"])
    with pytest.raises(CompressError, match="the input model changed since"):
        run_recipe(recipe, progress=False)


def test_a_second_run_into_a_held_folder_is_refused(workspace):
    recipe = write_recipe(workspace["root"] / "recipe.yaml", workspace["model"], workspace["book"], "out")
    with hold_run_lock(workspace["root"] / "out"):
        with pytest.raises(CompressError, match=r"another compress run \(pid \d+\) holds .*out"):
            run_recipe(recipe, progress=False)
    assert run_recipe(recipe, progress=False)["rows"][1]["layers"] == 3  # released: runs


def test_report_of_an_interrupted_run_is_marked_incomplete(workspace, monkeypatch):
    recipe = write_recipe(workspace["root"] / "recipe.yaml", workspace["model"], workspace["book"], "out",
                          stages=[{"layer_removal": {"layers": [0]}}, {"layer_removal": {"layers": [0]}}])
    crash_perplexity_at(monkeypatch, 3)  # baseline and stage 1 evaluated, crash in stage 2's evaluation
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(recipe, progress=False)
    out = workspace["root"] / "out"
    assert "> **Incomplete**: 2 of 3 steps are done (last: layer_removal)" in (out / "report.md").read_text()
    import json

    assert json.loads((out / "report.json").read_text())["complete"] is False
    restore_perplexity(monkeypatch)
    run_recipe(recipe, progress=False)
    assert "Incomplete" not in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["complete"] is True


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.write_text("x"), "exists and is not a folder"),
    (lambda p: (p.mkdir(), (p / "mine.txt").write_text("x")), "holds files that compress did not write"),
])
def test_validate_refuses_what_run_refuses(workspace, make, expected):
    make(workspace["root"] / "out")
    recipe = write_recipe(workspace["root"] / "recipe.yaml", workspace["model"], workspace["book"], "out")
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 1 and expected in result.output, result.output
    with pytest.raises(CompressError, match=expected):
        run_recipe(recipe, progress=False)


def test_validate_refuses_dev_null_as_output(workspace):
    recipe = write_recipe(workspace["root"] / "recipe.yaml", workspace["model"], workspace["book"], "/dev/null")
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 1 and "exists and is not a folder" in result.output, result.output


def test_validate_says_what_run_will_do_with_the_output(workspace):
    recipe = write_recipe(workspace["root"] / "recipe.yaml", workspace["model"], workspace["book"], "out")
    assert CliRunner().invoke(main, ["validate", str(recipe)]).output.rstrip().endswith("out: new run)")
    run_recipe(recipe, progress=False)
    assert "resumes the run there" in CliRunner().invoke(main, ["validate", str(recipe)]).output


def test_replace_dir_never_removes_a_folder_compress_did_not_write(tmp_path):
    new, final = tmp_path / "new", tmp_path / "final"
    new.mkdir()
    final.mkdir()
    (final / "thesis.tex").write_text("years of work")
    with pytest.raises(CompressError, match="holds files that compress did not write"):
        replace_dir(new, final)
    assert (final / "thesis.tex").read_text() == "years of work" and new.exists()


def test_the_input_model_is_never_written(workspace):
    before = content_hash(workspace["model"])
    recipe = write_recipe(workspace["root"] / "recipe.yaml", workspace["model"], workspace["book"], "out")
    run_recipe(recipe, progress=False)
    assert content_hash(workspace["model"]) == before


@pytest.mark.slow
def test_two_processes_into_one_folder_the_second_is_refused_and_the_first_finishes(workspace):
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe = write_recipe(workspace["root"] / "recipe.yaml", workspace["model"], workspace["book"], "out")
    cmd = [sys.executable, "-m", "compress.cli", "run", str(recipe), "--no-progress"]
    env = {**os.environ, "COMPRESS_CRASH_AT": "checkpoint", "COMPRESS_CRASH_SIGNAL": "STOP"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while Path(f"/proc/{first.pid}/stat").read_text().split(")")[1].split()[0] != "T":
            assert first.poll() is None and time.monotonic() < deadline, "first run never reached the point"
            time.sleep(0.2)
        tmp = list((workspace["root"] / "out" / "checkpoints").glob(".tmp-*"))
        assert len(tmp) == 1  # frozen mid-write
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert second.returncode == 1
        assert "another compress run (pid %d) holds" % first.pid in second.stderr, second.stderr
        assert tmp[0].exists()  # the second run's start-up cleanup did not touch it
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-2000:]
    assert (workspace["root"] / "out" / "checkpoints" / "layer_removal" / "compress.json").exists()
