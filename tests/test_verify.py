"""`compress verify` without vLLM: the comparison rules, the transformers engine end to end on a tiny
model, errors, and a recipe's `verify:` when no vLLM environment is configured (tests/serving/ runs vLLM)."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import yaml
from click.testing import CliRunner

import compress.verify.verify as verify_module
from compress.cli import main
from compress.errors import CompressError
from compress.pipeline import run_recipe
from compress.verify.agreement import judge, prompt_agreement
from compress.verify.verify import VerifyOptions, read_prompts, verify_checkpoints


def test_identical_float_generations_pass_and_a_flipped_token_fails_naming_the_position():
    same = prompt_agreement(0, [5, 6, 7], [-0.1, -0.2, -0.3], [5, 6, 7], [5, 6, 7], [-0.1, -0.2, -0.3])
    assert judge([same], quantized=False).ok and same.max_dlogp == 0.0 and same.top1_agree == 1.0
    flipped = prompt_agreement(1, [5, 9, 7], [-0.1, -2.0, -0.3], [5, 6, 7], [5, 6, 7], [-0.1, -2.5, -0.3])
    v = judge([same, flipped], quantized=False)
    assert not v.ok and v.reasons == ["prompt 1: tokens differ from position 1 (engine 9, transformers 6)"]
    assert flipped.top1_agree == pytest.approx(2 / 3) and flipped.max_dlogp == pytest.approx(0.5)
    assert v.top1_agree == pytest.approx(5 / 6)  # pooled over the 6 positions


def test_a_shorter_generation_is_a_difference():
    """The engine stopped (an end-of-sequence token) where transformers went on."""
    p = prompt_agreement(0, [5, 2], [-0.1, -0.1], [5, 2, 8], [5, 2], [-0.1, -0.1])
    assert not p.same_tokens and p.first_difference == 2


def test_a_rounded_float_file_may_part_only_at_a_near_tie():
    """An f16 GGUF of a float32 source (tie_nats set): tokens that part where transformers' top two are within
    tie_nats pass; a flip where transformers clearly prefers its own token fails, as does any flip without
    tie_nats (same weights on both sides)."""
    # position 1: engine took 9, transformers' argmax 6 with log-prob -0.70 vs -0.72 for 9 (a 0.02 tie)
    tie = prompt_agreement(0, [5, 9, 7], [-0.1, -0.72, -0.3], [5, 6, 7], [5, 6, 7], [-0.1, -0.72, -0.3],
                           [-0.1, -0.70, -0.3])
    assert abs(tie.max_disagreement_gap - 0.02) < 1e-9
    assert judge([tie], quantized=False, tie_nats=0.05).ok
    assert not judge([tie], quantized=False).ok
    clear = prompt_agreement(0, [5, 9, 7], [-0.1, -2.0, -0.3], [5, 6, 7], [5, 6, 7], [-0.1, -2.0, -0.3],
                             [-0.1, -0.2, -0.3])
    v = judge([clear], quantized=False, tie_nats=0.05)
    assert not v.ok and "tokens differ from position 1" in v.reasons[0]
    same = prompt_agreement(0, [5, 6], [-0.1, -0.2], [5, 6], [5, 6], [-0.1, -0.2], [-0.1, -0.2])
    assert same.max_disagreement_gap == 0.0 and judge([same], quantized=False, tie_nats=0.05).ok


def test_quantized_checkpoints_are_judged_by_agreement_and_logprob_thresholds():
    p = prompt_agreement(0, [1, 2, 3, 4], [-1.0, -1.0, -1.0, -1.0], [1, 2, 3, 9], [1, 2, 3, 9],
                         [-1.0, -1.2, -1.0, -1.5])
    assert judge([p], quantized=True, min_top1=0.75, max_dlogp=0.5).ok  # tokens differ: allowed when quantized
    v = judge([p], quantized=True, min_top1=0.9, max_dlogp=0.4)
    assert v.reasons == ["top-1 agreement 0.750 is below 0.900",
                         "max |Δ logprob| 0.500 (prompt 0) is above 0.400"]


def test_transformers_engine_in_a_fresh_process_agrees_with_the_reference(tiny_model_dir):
    """The whole path (engine worker subprocess, reference, comparison) on a plain HF folder."""
    results = verify_checkpoints([tiny_model_dir], VerifyOptions(engine="transformers", tokens=6,
                                                                 prompts=["a b c", "hello world"]))
    (r,) = results
    assert r.ok and r.status == "ok" and r.quantization is None and r.dtype == "float32"
    assert r.verdict.same_tokens and r.verdict.top1_agree == 1.0 and r.verdict.max_dlogp < 1e-4
    assert all(0 < p.positions <= 6 for p in r.verdict.prompts)


def test_verify_reports_what_differs_and_exits_1(tiny_model_dir, monkeypatch, tmp_path):
    """An engine whose tokens differ (simulated: its result is altered) fails with the position named."""
    real = verify_module.run_engine

    def altered(*a, **k):
        out = real(*a, **k)
        first = out["results"][0]["outputs"][0]
        first["tokens"][1] = (first["tokens"][1] + 1) % 50
        return out
    monkeypatch.setattr(verify_module, "run_engine", altered)
    res = CliRunner().invoke(main, ["verify", str(tiny_model_dir), "--engine", "transformers", "--tokens", "4",
                                    "--json", str(tmp_path / "v.json")])
    assert res.exit_code == 1, res.output
    assert "| differs |" in res.output and "prompt 0: tokens differ from position 1" in res.output
    assert json.loads((tmp_path / "v.json").read_text())[0]["status"] == "differs"


def test_an_engine_that_refuses_the_checkpoint_is_reported_with_its_error(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    res = CliRunner().invoke(main, ["verify", str(broken), "--engine", "transformers"])
    assert res.exit_code == 1 and "| refused |" in res.output and "transformers refused it" in res.output


def test_vllm_without_an_environment_says_how_to_make_one(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("COMPRESS_VLLM_PYTHON", raising=False)
    with pytest.raises(CompressError, match=r"no vllm environment configured .*bash scripts/vllm-env.sh"):
        verify_checkpoints([tiny_model_dir], VerifyOptions(engine="vllm"))
    monkeypatch.setenv("COMPRESS_VLLM_PYTHON", "/nonexistent/python")
    with pytest.raises(CompressError, match="COMPRESS_VLLM_PYTHON: /nonexistent/python is not an executable Python"):
        verify_checkpoints([tiny_model_dir], VerifyOptions(engine="vllm"))


def test_bad_checkpoints_and_prompt_files_are_named(tmp_path):
    with pytest.raises(CompressError, match="not a folder"):
        verify_checkpoints([tmp_path / "nope"], VerifyOptions(engine="transformers"))
    with pytest.raises(CompressError, match="has no readable config.json"):
        verify_checkpoints([tmp_path], VerifyOptions(engine="transformers"))
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(CompressError, match=r"p.jsonl, line 2: expected a JSON object with a \"prompt\""):
        read_prompts(tmp_path / "p.jsonl")
    (tmp_path / "p.txt").write_text("one\n\n two\\nlines\n")
    assert read_prompts(tmp_path / "p.txt") == ["one", " two\nlines"]
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(CompressError, match="holds no prompt"):
        read_prompts(tmp_path / "e.txt")


def _recipe(tmp_path, model_dir, text_file, **extra):
    body = {"model": str(model_dir), "dtype": "float32", "device": "cpu", "output": "run",
            "calibration": {"path": str(text_file), "samples": 4, "seq_len": 16},
            "evaluate": {"after": []}, "stages": [{"layer_removal": {"metric": "bi", "remove": 2}}], **extra}
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


def test_recipe_verify_runs_after_saving_and_lands_in_the_report(tmp_path, tiny_model_dir, text_file):
    report = run_recipe(_recipe(tmp_path, tiny_model_dir, text_file, verify=["transformers"]), progress=False)
    (entry,) = report["verify"]
    assert entry["checkpoint"] == "checkpoints/layer_removal" and entry["status"] == "ok" and entry["same_tokens"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Serving checks" in md and "| checkpoints/layer_removal | transformers" in md


def test_recipe_verify_vllm_without_environment_is_skipped_with_the_reason(tmp_path, tiny_model_dir, text_file,
                                                                        monkeypatch, caplog):
    monkeypatch.delenv("COMPRESS_VLLM_PYTHON", raising=False)
    with caplog.at_level(logging.WARNING, logger="compress"):
        report = run_recipe(_recipe(tmp_path, tiny_model_dir, text_file, verify=["vllm"]), progress=False)
    (entry,) = report["verify"]
    assert entry["status"] == "skipped" and "COMPRESS_VLLM_PYTHON is not set" in entry["reason"]
    assert any("verify: vllm skipped" in r.getMessage() for r in caplog.records)
    assert "skipped: no vllm environment configured" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.parametrize("extra, message", [
    ({"verify": ["vllm"], "save": []}, "verify: checks saved checkpoints, but save: [] saves none"),
    ({"verify": ["vllm", "vllm"]}, "verify: lists an engine twice"),
    ({"verify": ["tgi"]}, "verify.0"),
])
def test_recipe_verify_errors(tmp_path, tiny_model_dir, text_file, extra, message):
    from compress.recipe import load_recipe

    with pytest.raises(CompressError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(_recipe(tmp_path, tiny_model_dir, text_file, **extra))


def test_engine_worker_imports_nothing_from_compress():
    """It runs in vLLM's environment, where compress is not installed."""
    from compress.verify import engines

    source = engines.WORKER.read_text()
    assert "compress" not in "".join(l for l in source.splitlines() if l.startswith(("import", "from")))
    assert sys.executable  # the transformers engine defaults to this interpreter
