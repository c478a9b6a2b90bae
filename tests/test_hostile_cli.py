"""Hostile CLI and data inputs (issue 16): every command x every path option x {absent, a file where
a folder is expected and vice versa, a FIFO, a device, unwritable}, every numeric option huge, disk
full. Each must end as ONE message and exit 1 (click's usage errors: exit 2), never a traceback, a
hang or an endless read; path problems are found before any model loads."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from pydantic import ValidationError

import compress.model_io as model_io
import compress.scoring  # noqa: F401  (imported before no_model_load patches model_io.load_model)
from compress.cli import main
from compress.data.local import load_local_texts
from compress.data.sources import CalibrationConfig
from compress.data.tokens import calibration_batches
from compress.errors import CompressError
from compress.limits import MAX_SEED
from compress.model_io import content_hash, save_checkpoint, write_atomic
from conftest import TEXT, tiny_model


class Fifo:
    """A named pipe; a watchdog opens its write end whenever a reader waits on it, so code that
    wrongly opens it gets EOF instead of hanging, and ``was_opened`` tells the test it happened."""

    def __init__(self, path: Path):
        self.path, self.was_opened, self._stop = path, False, threading.Event()
        os.mkfifo(path)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody is reading
                time.sleep(0.01)
                continue
            self.was_opened = True
            os.close(fd)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def fifos():
    made: list[Fifo] = []

    def make(path: Path) -> Path:
        made.append(Fifo(path))
        return path
    yield make
    for f in made:
        f.close()
        assert not f.was_opened, f"{f.path} was opened for reading"


def invoke(args: list[str]):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def fails_with(args: list[str], expected: str, code: int = 1) -> str:
    result = invoke(args)
    assert result.exit_code == code, result.output
    assert expected in result.output, result.output
    return result.output


# ---- text inputs: --ppl, --data, calibration.path ---------------------------------------------

def text_input(kind: str, tmp_path: Path, fifos) -> Path:
    """A bad text source of the given kind."""
    if kind == "absent":
        return tmp_path / "absent.txt"
    if kind == "empty_file":
        (tmp_path / "empty.txt").write_text("")
        return tmp_path / "empty.txt"
    if kind == "fifo":
        return fifos(tmp_path / "pipe.txt")
    if kind == "device":
        return Path("/dev/zero")
    if kind == "device_link":
        (tmp_path / "zero.txt").symlink_to("/dev/zero")
        return tmp_path / "zero.txt"
    if kind == "empty_folder":
        (tmp_path / "texts").mkdir()
        return tmp_path / "texts"
    if kind == "folder_of_fifo_device_and_empty":
        d = tmp_path / "texts"
        d.mkdir()
        fifos(d / "a.txt")
        (d / "b.txt").symlink_to("/dev/zero")
        (d / "c.jsonl").write_text("")
        (d / "d.txt").mkdir()
        return d
    if kind == "wrong_suffix":
        (tmp_path / "book.csv").write_text(TEXT)
        return tmp_path / "book.csv"
    raise ValueError(kind)


TEXT_KINDS = {
    "absent": "does not exist",
    "empty_file": "empty.txt is empty; perplexity and calibration need text (at least 2 tokens)",
    "fifo": "pipe.txt is a FIFO (named pipe); only regular files are read",
    "device": "/dev/zero is a device; only regular files are read",
    "device_link": "is a device; only regular files are read",
    "empty_folder": "the folder holds no non-empty regular .txt or .jsonl file",
    "folder_of_fifo_device_and_empty": "the folder holds no non-empty regular .txt or .jsonl file",
    "wrong_suffix": "book.csv: expected a .txt or .jsonl file",
}


@pytest.mark.parametrize("kind", sorted(TEXT_KINDS))
@pytest.mark.parametrize("command", ["eval", "score"])
def test_bad_text_source_is_refused_before_the_model_loads(command, kind, tiny_model_dir, tmp_path, fifos,
                                                           no_model_load):
    path = text_input(kind, tmp_path, fifos)
    args = (["eval", tiny_model_dir, "--ppl", path, "--seq-len", "16"] if command == "eval" else
            ["score", tiny_model_dir, "--metric", "bi", "--data", path, "--samples", "2", "--seq-len", "8"])
    out = fails_with(args, TEXT_KINDS[kind])
    assert path.name in out or str(path.resolve()) in out  # eval names the file as resolved


def test_whitespace_only_text_names_the_file(tiny_model_dir, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n\t \n")
    fails_with(["eval", tiny_model_dir, "--ppl", blank, "--seq-len", "16"],
               f"text source {blank} holds no text (only whitespace or empty documents)")


def test_one_token_of_text_is_too_little_for_perplexity(tiny_model_dir, tiny_tokenizer, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a")
    assert len(tiny_tokenizer("a")["input_ids"]) == 1  # this tokenizer adds no BOS
    fails_with(["eval", tiny_model_dir, "--ppl", one, "--seq-len", "16"],
               f"perplexity needs at least 2 tokens, but {one} gives 1: give more text")


def test_too_little_calibration_text_names_the_source(tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("It is a truth.")
    fails_with(["score", tiny_model_dir, "--metric", "bi", "--data", short, "--samples", "2", "--seq-len", "64"],
               "calibration text short.txt has")


@pytest.mark.parametrize("kind", ["empty_file", "fifo"])
def test_bad_calibration_path_in_a_recipe(kind, tiny_model_dir, text_file, tmp_path, fifos):
    path = text_input(kind, tmp_path, fifos)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "output": "run",
        "calibration": {"path": str(path), "samples": 2, "seq_len": 8},
        "evaluate": {"perplexity": {"path": str(text_file), "seq_len": 32, "max_tokens": 64}},
        "stages": [{"layer_removal": {"metric": "bi", "remove": 1}}]}))
    fails_with(["run", recipe, "--no-progress"], TEXT_KINDS[kind])


def test_reading_stops_at_max_chars(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("abcdefghij" * 1000)
    assert load_local_texts(big, max_chars=25) == ["abcdefghijabcdefghijabcde"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": "x" * 10}) for _ in range(100)))
    assert load_local_texts(rows, max_chars=25) == ["x" * 10] * 3
    assert load_local_texts(big, max_chars=10**30) == ["abcdefghij" * 1000]  # beyond sys.maxsize


# ---- output paths: eval --out (a file), score --out / compare --out (folders) ----------------

def output_path(kind: str, tmp_path: Path, model_dir: Path, fifos) -> Path:
    if kind == "existing_folder":
        (tmp_path / "outdir").mkdir()
        return tmp_path / "outdir"
    if kind == "existing_file":
        (tmp_path / "out.json").write_text("{}")
        return tmp_path / "out.json"
    if kind == "fifo":
        return fifos(tmp_path / "out.pipe")
    if kind == "under_a_file":
        (tmp_path / "plain").write_text("x")
        return tmp_path / "plain" / "sub" / "out.json"
    if kind == "inside_model":
        return model_dir / "eval" / "row.json"
    if kind == "the_model_folder":
        return model_dir
    raise ValueError(kind)


OUT_CASES = [  # command, kind, expected
    ("eval", "existing_folder", "outdir is a folder; give a file name, e.g."),
    ("eval", "fifo", "out.pipe is a FIFO (named pipe); give a regular file name"),
    ("eval", "under_a_file", "plain is a file, not a folder"),
    ("eval", "inside_model", "compress never writes into the input model folder"),
    ("eval", "the_model_folder", "compress never writes into the input model folder"),
    ("score", "existing_file", "out.json is a file; give a folder (it is created if absent)"),
    ("score", "fifo", "out.pipe is a FIFO (named pipe); give a folder"),
    ("score", "under_a_file", "plain is a file, not a folder"),
    ("score", "inside_model", "compress never writes into the input model folder"),
    ("compare", "existing_file", "out.json is a file; give a folder (it is created if absent)"),
    ("compare", "fifo", "out.pipe is a FIFO (named pipe); give a folder"),
    ("compare", "under_a_file", "plain is a file, not a folder"),
]


@pytest.mark.parametrize("command, kind, expected", OUT_CASES)
def test_bad_out_is_refused_before_any_work(command, kind, expected, tiny_model_dir, text_file, tmp_path,
                                            fifos, no_model_load):
    before = content_hash(tiny_model_dir)
    out = output_path(kind, tmp_path, tiny_model_dir, fifos)
    if command == "eval":
        args = ["eval", tiny_model_dir, "--ppl", text_file, "--seq-len", "16", "--out", out]
    elif command == "score":
        args = ["score", tiny_model_dir, "--metric", "sequential", "--out", out]
    else:
        run = tmp_path / "run"
        run.mkdir()
        (run / "report.json").write_text(json.dumps({"rows": [{"step": "baseline", "ppl": 9.0}]}))
        args = ["compare", run, "--out", out]
    output = fails_with(args, expected)
    assert output.startswith("Error: --out: "), output
    assert content_hash(tiny_model_dir) == before


def test_eval_out_writes_the_row_outside_the_model(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "rows" / "eval.json"
    result = invoke(["eval", tiny_model_dir, "--ppl", text_file, "--seq-len", "32", "--max-tokens", "128",
                     "--out", out])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["ppl_tokens"] == 128 - 128 // 32  # each window's first token has no context
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temporary file left


# ---- devices and numbers ----------------------------------------------------------------------

@pytest.mark.parametrize("device", ["bogus", "cuda:x", "meta", "cpu0", "cuda:-1", "gpu"])
@pytest.mark.parametrize("command", ["eval", "score"])
def test_unknown_device_lists_the_allowed_ones(command, device, tiny_model_dir, no_model_load):
    args = ["eval", tiny_model_dir] if command == "eval" else ["score", tiny_model_dir, "--metric", "sequential"]
    fails_with([*args, "--device", device],
               f"device: {device!r} is not a device compress runs on; allowed: auto, cpu, cuda, cuda:N, mps")


HUGE = str(10**23)
NUMERIC = [("score", o) for o in ("--seed", "--samples", "--seq-len")] + \
          [("eval", o) for o in ("--seq-len", "--max-tokens", "--limit", "--prompt-tokens", "--new-tokens",
                                 "--shots")]


@pytest.mark.parametrize("command, option", NUMERIC)
def test_huge_numbers_are_usage_errors(command, option, tiny_model_dir, no_model_load):
    args = [command, tiny_model_dir] + (["--metric", "bi"] if command == "score" else [])
    out = fails_with([*args, option, HUGE], f"Invalid value for '{option}': {HUGE} is not in the range", code=2)
    assert "Usage:" in out


def test_a_seed_in_float_notation_is_a_usage_error(tiny_model_dir):
    fails_with(["score", tiny_model_dir, "--metric", "bi", "--seed", "1e23"],
               "Invalid value for '--seed': '1e23' is not a valid integer", code=2)


def test_seed_bound_is_torchs_own():
    torch.Generator().manual_seed(MAX_SEED)
    with pytest.raises((RuntimeError, ValueError), match="Overflow"):
        torch.Generator().manual_seed(MAX_SEED + 1)
    batches = calibration_batches(torch.arange(100), samples=3, seq_len=8, seed=MAX_SEED, batch_size=3)
    assert batches[0]["input_ids"].shape == (3, 8)
    with pytest.raises(ValidationError, match=r"must be in 0..18446744073709551615 \(2\*\*64-1\)"):
        CalibrationConfig(path="x.txt", seed=MAX_SEED + 1)


def test_huge_seed_in_a_recipe_is_a_recipe_error(tiny_model_dir, text_file, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "output": "run",
        "calibration": {"path": str(text_file), "samples": 2, "seq_len": 8, "seed": 10**23},
        "stages": [{"layer_removal": {"metric": "bi", "remove": 1}}]}))
    fails_with(["validate", recipe], "calibration.seed")


# ---- inspect: compress.json of every wrong shape -----------------------------------------------

GOOD_PROVENANCE = {"stage": "layer_removal", "recipe_path": "/r.yaml", "source": {"model": "/m"},
                   "original_num_layers": 5, "kept_layers": [0, 1, 4], "removed_layers": [2, 3],
                   "stages": [{"name": "layer_removal", "summary": "removed 2 layers"}],
                   "versions": {"compress": "0.1"}}
PROVENANCE_CASES = {
    "{}": "missing key 'stage'; missing key 'recipe_path'",
    "[]": "expected a JSON object, got list",
    "null": "expected a JSON object, got NoneType",
    "{not json": "not valid JSON",
    json.dumps({**GOOD_PROVENANCE, "kept_layers": "0,1,4"}): "'kept_layers' should be list, got str",
    json.dumps({**GOOD_PROVENANCE, "original_num_layers": True}): "'original_num_layers' should be int, got bool",
    json.dumps({**GOOD_PROVENANCE, "stages": [{"name": 3}]}): "stages[0] should be an object with string 'name'",
    json.dumps({k: v for k, v in GOOD_PROVENANCE.items() if k != "versions"}): "missing key 'versions'",
}


@pytest.mark.parametrize("body", list(PROVENANCE_CASES))
def test_inspect_malformed_provenance(body, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt/compress.json").write_text(body)
    out = fails_with(["inspect", tmp_path / "ckpt"], PROVENANCE_CASES[body])
    assert str(tmp_path / "ckpt/compress.json") in out


def test_inspect_good_provenance(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt/compress.json").write_text(json.dumps(GOOD_PROVENANCE))
    result = invoke(["inspect", tmp_path / "ckpt"])
    assert result.exit_code == 0, result.output
    assert "layers: kept 3 of 5; removed (original indices) [2, 3]" in result.output


@pytest.mark.parametrize("kind, expected", [
    ("absent", "no compress.json; the folder does not exist"),
    ("file", "ckpt is a file, not a folder"),
    ("fifo_checkpoint", "ckpt is a FIFO (named pipe), not a folder"),
    ("fifo_json", "compress.json: "),
    ("folder_json", "compress.json is a folder; only regular files are read"),
])
def test_inspect_bad_paths(kind, expected, tmp_path, fifos):
    ckpt = tmp_path / "ckpt"
    if kind == "file":
        ckpt.write_text("x")
    elif kind == "fifo_checkpoint":
        fifos(ckpt)
    elif kind != "absent":
        ckpt.mkdir()
        if kind == "fifo_json":
            fifos(ckpt / "compress.json")
            expected = f"{ckpt / 'compress.json'} is a FIFO (named pipe); only regular files are read"
        else:
            (ckpt / "compress.json").mkdir()
    fails_with(["inspect", ckpt], expected)


# ---- compare: runs without or with a corrupt report.json ---------------------------------------

REPORT_CASES = {
    None: "no report.json; give folders written by `compress run`",
    "": "not valid JSON",
    "{": "not valid JSON",
    "{}": "not a compress report (expected an object with a non-empty list 'rows', got dict)",
    "[]": "not a compress report (expected an object with a non-empty list 'rows', got list)",
    '{"rows": []}': "non-empty list 'rows'",
    '{"rows": [3]}': "rows[0] should be an object, got int",
    '{"rows": [{"ppl": 3}]}': "rows[0].step should be a string",
    '{"rows": [{"step": "baseline", "ppl": "low"}]}': "rows[0].ppl should be a number, got 'low'",
    '{"rows": [{"step": "b", "weight_bytes": [1]}]}': "rows[0].weight_bytes should be a number, got [1]",
}


@pytest.mark.parametrize("body", list(REPORT_CASES), ids=repr)
def test_compare_corrupt_report(body, tmp_path, fifos):
    run = tmp_path / "run"
    run.mkdir()
    if body is not None:
        (run / "report.json").write_text(body)
    fails_with(["compare", run, "--out", tmp_path / "cmp"], REPORT_CASES[body])
    assert not (tmp_path / "cmp" / "compare.md").exists()


@pytest.mark.parametrize("kind, expected", [
    ("absent", "run: does not exist; give folders written by `compress run`"),
    ("file", "run: is a file; give folders written by `compress run`"),
    ("fifo_report", "report.json is a FIFO (named pipe); only regular files are read"),
])
def test_compare_bad_run_paths(kind, expected, tmp_path, fifos):
    run = tmp_path / "run"
    if kind == "file":
        run.write_text("x")
    elif kind == "fifo_report":
        run.mkdir()
        fifos(run / "report.json")
    fails_with(["compare", run, "--out", tmp_path / "cmp"], expected)


def test_compare_good_report(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"rows": [{"step": "baseline", "ppl": 9.0, "layers": 5}]}))
    result = invoke(["compare", run, "--out", tmp_path / "cmp"])
    assert result.exit_code == 0, result.output
    assert "| run/baseline | 5 | 9.000 (+0.0%) |" in result.output


# ---- disk full ---------------------------------------------------------------------------------

def enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def stored_bytes(model) -> int:
    seen = {}
    for t in model.state_dict().values():
        seen[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


@pytest.mark.parametrize("failure", ["oserror", "safetensors"])
def test_disk_full_during_a_checkpoint_write(failure, tiny_tokenizer, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    model = tiny_model("llama", 3)
    final = tmp_path / "checkpoints" / "layer_removal"
    save_checkpoint(model, tiny_tokenizer, final, {"stage": "old"})  # an older checkpoint stays intact
    old = content_hash(final)

    def full(model, folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        if failure == "oserror":
            enospc()
        # what safetensors raises on a full disk (measured on a 256 KiB tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(CompressError) as e:
        save_checkpoint(model, tiny_tokenizer, final, {"stage": "new"}, saver=full)
    need = stored_bytes(model)
    assert str(e.value).startswith(f"disk full: cannot write checkpoint layer_removal in {final.parent} (")
    assert f" free; it needs about {need} bytes); nothing partial was left" in str(e.value)
    assert sorted(p.name for p in final.parent.iterdir()) == ["layer_removal"]  # no temp folder
    assert content_hash(final) == old


def test_disk_full_while_writing_the_provenance(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(model_io.os, "fsync", enospc)
    with pytest.raises(CompressError, match=r"^disk full: cannot write checkpoint ck in "):
        save_checkpoint(tiny_model("llama", 2), tiny_tokenizer, tmp_path / "ck", {"stage": "x"})
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_disk_full_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "scores.json"
    target.write_text("old")
    monkeypatch.setattr(model_io.os, "fsync", enospc)
    text = "é" * 100  # 200 bytes in UTF-8
    with pytest.raises(CompressError) as e:
        write_atomic(target, text)
    assert str(e.value).startswith(f"disk full: cannot write scores.json in {tmp_path} (")
    assert " free; it needs about 200 bytes)" in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"] and target.read_text() == "old"


def test_write_atomic_other_os_errors_are_one_message(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(model_io.tempfile, "mkstemp", denied)
    with pytest.raises(CompressError, match=f"^cannot write {tmp_path / 'a.json'}: Permission denied$"):
        write_atomic(tmp_path / "a.json", "{}")


def test_disk_full_in_compress_score_is_one_message(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(model_io.os, "fsync", enospc)
    out = tmp_path / "scores"
    fails_with(["score", tiny_model_dir, "--metric", "sequential", "--out", out],
               f"disk full: cannot write scores.json in {out}")
    assert list(out.iterdir()) == []


def test_disk_full_in_compress_run_leaves_no_partial_checkpoint(tiny_model_dir, text_file, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", lambda self, folder, **k: enospc())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "output": "run",
        "calibration": {"path": str(text_file), "samples": 2, "seq_len": 8},
        "stages": [{"layer_removal": {"metric": "bi", "remove": 1}}], "save": ["layer_removal"]}))
    fails_with(["run", recipe, "--no-progress"], "disk full: cannot write checkpoint layer_removal in ")
    leftovers = [p for p in (tmp_path / "run").rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_disk_full_while_saving_a_plot(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def full(self, path, *a, **k):
        Path(path).write_bytes(b"\x89PNG partial")
        enospc()
    monkeypatch.setattr(Figure, "savefig", full)
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": "baseline", "ppl": 9.0, "weight_bytes": 2**20},
            {"step": "small", "ppl": 11.0, "weight_bytes": 2**19}]
    (run / "report.json").write_text(json.dumps({"rows": rows}))
    fails_with(["compare", run, "--out", tmp_path / "cmp"],
               f"disk full: cannot write ppl_vs_weights.png in {tmp_path / 'cmp'}")
    assert list((tmp_path / "cmp").iterdir()) == []
