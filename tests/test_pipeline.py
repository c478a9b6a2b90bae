"""`compress run` end to end on a tiny model: report, loadable checkpoint, provenance, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import compress.importance as importance
import compress.evaluate.suite as suite
import compress.pipeline as pipeline_module
from compress.cli import main
from compress.errors import CompressError
from compress.model_io import content_hash
from compress.pipeline import run_recipe
from compress.stages.base import StageConfig, StageRecord
from conftest import crash_perplexity_at, restore_perplexity, tiny_model
from compress.surgery import decoder_layers

IDS = torch.randint(1, 320, (2, 12), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def recipe(tmp_path, tiny_model_dir, text_file) -> Path:
    body = {
        "model": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "output": "run",
        "calibration": {"path": str(text_file), "samples": 4, "seq_len": 16, "label": "tiny book"},
        "evaluate": {"perplexity": {"path": str(text_file), "seq_len": 32, "max_tokens": 256}},
        "stages": [{"layer_removal": {"metric": "bi", "remove": 2}}],
    }
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


def skipped_logits(model_dir: Path, skip: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    handles = [decoder_layers(model)[i].register_forward_hook(lambda m, a, o: a[0]) for i in skip]
    with torch.no_grad():
        out = model(IDS).logits
    for h in handles:
        h.remove()
    return out


def test_run_writes_report_and_a_checkpoint_transformers_loads(recipe, tiny_model_dir, tmp_path):
    before = content_hash(tiny_model_dir)
    report = run_recipe(recipe, progress=False)
    run = tmp_path / "run"
    rows = report["rows"]
    assert [r["step"] for r in rows] == ["baseline", "layer_removal"]
    assert [r["layers"] for r in rows] == [5, 3]
    assert rows[1]["params"] < rows[0]["params"] and rows[0]["ppl"] > 1 and rows[1]["ppl"] > 1
    assert rows[1]["ppl_tokens"] == rows[0]["ppl_tokens"] > 0
    assert json.loads((run / "report.json").read_text())["rows"][1]["layers"] == 3
    assert "| layer_removal | 3 |" in (run / "report.md").read_text()
    assert (run / "plots" / "layer_removal-scores.png").stat().st_size > 1000
    assert (run / "plots" / "ppl_vs_weights.png").stat().st_size > 1000
    assert "](plots/ppl_vs_weights.png)" in (run / "report.md").read_text()

    ckpt = run / "checkpoints" / "layer_removal"
    prov = json.loads((ckpt / "compress.json").read_text())
    removed = prov["removed_layers"]
    assert len(removed) == 2 and prov["kept_layers"] == [i for i in range(5) if i not in removed]
    scores = prov["stages"][0]["details"]["scores"]
    assert sorted(removed) == sorted(sorted(range(5), key=lambda i: scores[i])[:2])
    assert prov["source"]["content_sha256"] == before and prov["versions"]["transformers"]

    reloaded = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, skipped_logits(tiny_model_dir, removed),
                                   rtol=1e-5, atol=1e-5)
    assert (ckpt / "tokenizer.json").exists() and (ckpt / "generation_config.json").exists()
    assert content_hash(tiny_model_dir) == before  # the input model is never written
    assert not list(run.glob("checkpoints/.tmp-*"))


def test_rerun_resumes_without_redoing_work(recipe, tmp_path, monkeypatch):
    first = run_recipe(recipe, progress=False)

    def boom(*a, **k):
        raise AssertionError("a finished step was redone")
    monkeypatch.setattr(importance, "score_layers", boom)
    monkeypatch.setattr(suite, "perplexity", boom)
    monkeypatch.setattr("compress.stages.layer_removal.score_layers", boom)
    second = run_recipe(recipe, progress=False)
    assert [r["ppl"] for r in second["rows"]] == [r["ppl"] for r in first["rows"]]


def test_crash_after_a_stage_resumes_from_its_record(recipe, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = suite.perplexity

    def crash_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash during the evaluation after the stage")
        return real(*a, **k)
    monkeypatch.setattr(suite, "perplexity", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(recipe, progress=False)
    assert not (tmp_path / "run" / "checkpoints" / "layer_removal").exists()

    monkeypatch.setattr(suite, "perplexity", real)
    monkeypatch.setattr("compress.stages.layer_removal.score_layers",
                        lambda *a, **k: pytest.fail("scores were recomputed on resume"))
    resumed = run_recipe(recipe, progress=False)

    fresh_recipe = recipe.with_name("fresh.yaml")
    fresh_recipe.write_text(recipe.read_text().replace("output: run", "output: fresh"))
    monkeypatch.undo()
    fresh = run_recipe(fresh_recipe, progress=False)
    assert [r["ppl"] for r in resumed["rows"]] == pytest.approx([r["ppl"] for r in fresh["rows"]], rel=1e-9)
    a = (tmp_path / "run/checkpoints/layer_removal/model.safetensors").read_bytes()
    b = (tmp_path / "fresh/checkpoints/layer_removal/model.safetensors").read_bytes()
    assert a == b


def test_output_of_another_recipe_is_refused_unless_overwrite(recipe, tmp_path):
    other = recipe.with_name("other.yaml")
    other.write_text(recipe.read_text().replace("remove: 2", "remove: 1"))
    run_recipe(other, progress=False)
    with pytest.raises(CompressError, match="holds a run of another recipe"):
        run_recipe(recipe, progress=False)
    assert json.loads((tmp_path / "run" / "report.json").read_text())["rows"][1]["layers"] == 4
    run_recipe(recipe, overwrite=True, progress=False)
    assert json.loads((tmp_path / "run" / "report.json").read_text())["rows"][1]["layers"] == 3
    assert not (tmp_path / ".run.new").exists()


def test_cli_run_prints_the_stage_table(recipe):
    result = CliRunner().invoke(main, ["run", str(recipe), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "| baseline | 5 |" in result.output and "| layer_removal | 3 |" in result.output


def test_cli_inspect_shows_provenance(recipe, tmp_path):
    run_recipe(recipe, progress=False)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "run/checkpoints/layer_removal")])
    assert result.exit_code == 0, result.output
    assert "kept 3 of 5; removed (original indices) [" in result.output


def test_chained_removals_record_original_indices(recipe, tmp_path):
    body = yaml.safe_load(recipe.read_text())
    body["stages"] = [{"layer_removal": {"layers": [0]}}, {"layer_removal": {"layers": [0, 2]}}]
    body["save"] = ["layer_removal_2"]
    recipe.write_text(yaml.safe_dump(body))
    report = run_recipe(recipe, progress=False)
    assert [r["layers"] for r in report["rows"]] == [5, 4, 2]
    prov = json.loads((tmp_path / "run/checkpoints/layer_removal_2/compress.json").read_text())
    assert prov["removed_layers"] == [0, 1, 3] and prov["kept_layers"] == [2, 4]


def test_score_command_prints_table_and_writes_plot(tiny_model_dir, text_file, tmp_path):
    result = CliRunner().invoke(main, ["score", str(tiny_model_dir), "--metric", "bi", "--data", str(text_file),
                                       "--samples", "4", "--seq-len", "16", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "s/scores.json").read_text())
    assert len(scores["scores"]) == 5 and sorted(scores["order"]) == list(range(5))
    assert (tmp_path / "s/bi-scores.png").exists()
    assert "removal order: " in result.output


def test_efficiency_rows_and_a_failing_fast_path_is_reported(recipe, monkeypatch):
    body = yaml.safe_load(recipe.read_text())
    body["evaluate"]["efficiency"] = {"prompt_tokens": 8, "new_tokens": 4, "repeats": 2}
    recipe.write_text(yaml.safe_dump(body))
    real = suite.measure_latency

    def fast_fails(model, fast=False, **kw):
        if fast:
            raise RuntimeError("no static cache here")
        return real(model, **kw)
    monkeypatch.setattr(suite, "measure_latency", fast_fails)
    report = run_recipe(recipe, progress=False)
    for row in report["rows"]:
        assert row["prefill_ms"] > 0 and row["decode_tok_s"] > 0 and row["latency_setting"] == "P=8 N=4 B=1"
        assert row["fast_path_error"] == "RuntimeError: no static cache here"
        assert "decode_tok_s_fast" not in row
    assert "decode tok/s" in (Path(report["output"]) / "report.md").read_text()


def test_eval_any_model_and_compare_runs(recipe, tiny_model_dir, text_file, tmp_path):
    result = CliRunner().invoke(main, ["eval", str(tiny_model_dir), "--ppl", str(text_file), "--seq-len", "32",
                                       "--max-tokens", "256", "--out", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "eval.json").read_text())
    run_recipe(recipe, progress=False)
    baseline = json.loads((tmp_path / "run/report.json").read_text())["rows"][0]
    assert row["ppl"] == pytest.approx(baseline["ppl"], rel=1e-6) and row["layers"] == 5

    other = recipe.with_name("other.yaml")
    body = yaml.safe_load(recipe.read_text())
    body["output"], body["stages"] = "other", [{"layer_removal": {"metric": "reverse", "remove": 3}}]
    other.write_text(yaml.safe_dump(body))
    run_recipe(other, progress=False)
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "run"), str(tmp_path / "other"),
                                       "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert "| run/layer_removal | 3 |" in result.output and "| other/layer_removal | 2 |" in result.output
    assert (tmp_path / "cmp/ppl_vs_weights.png").stat().st_size > 1000


def test_pareto_front():
    from compress.compare import pareto_front

    pts = [(10, 5.0), (8, 6.0), (8, 7.0), (4, 9.0), (12, 4.0)]  # (size, ppl): lower is better
    assert pareto_front(pts, higher_is_better=False) == [3, 1, 0, 4]
    acc = [(10, 0.5), (8, 0.4), (4, 0.45), (12, 0.6)]
    assert pareto_front(acc, higher_is_better=True) == [2, 0, 3]


def test_layerwise_run_gives_the_same_results_as_a_normal_run(recipe, tmp_path):
    normal = run_recipe(recipe, progress=False)
    body = yaml.safe_load(recipe.read_text())
    body["output"], body["layerwise"] = "lw", True
    lw_recipe = recipe.with_name("lw.yaml")
    lw_recipe.write_text(yaml.safe_dump(body))
    lw = run_recipe(lw_recipe, progress=False)
    assert lw["layerwise"] is True and normal["layerwise"] is False
    assert [r["ppl"] for r in lw["rows"]] == pytest.approx([r["ppl"] for r in normal["rows"]], rel=1e-6)
    a = (tmp_path / "run/checkpoints/layer_removal/model.safetensors").read_bytes()
    b = (tmp_path / "lw/checkpoints/layer_removal/model.safetensors").read_bytes()
    assert a == b


def test_auto_layerwise_when_the_weights_do_not_fit_the_accelerator(recipe, monkeypatch):
    from compress.recipe import load_recipe

    def fits_only_cpu(config, dtype, device):
        if device.type != "cpu":
            raise CompressError(f"the model needs about 13.5 GiB ..., but {device} has 8.0 GiB free; ...")
        return 1
    monkeypatch.setattr(pipeline_module, "check_fits", fits_only_cpu)
    p = pipeline_module.Pipeline.__new__(pipeline_module.Pipeline)
    p.recipe, p.config, p.dtype, p.device = load_recipe(recipe), None, torch.float16, torch.device("meta")
    assert p.choose_layerwise() is True  # too big for the accelerator, fits the CPU: layer by layer
    p.device = torch.device("cpu")
    with pytest.raises(CompressError, match="has 8.0 GiB free"):
        monkeypatch.setattr(pipeline_module, "check_fits",
                            lambda c, d, dev: (_ for _ in ()).throw(CompressError("has 8.0 GiB free")))
        p.choose_layerwise()


class HalveNorm:
    """A stand-in for a costly stage (like quantization): not replayable, so the pipeline must
    write its checkpoint and resume from it."""

    name = "halve_norm"
    needs_calibration = changes_depth = quantizes = False
    replayable = False
    applied = 0

    class Config(StageConfig):
        pass

    def __init__(self, config):
        self.config = config

    def check(self, facts):
        return []

    def apply(self, model, ctx):
        HalveNorm.applied += 1
        with torch.no_grad():
            model.model.norm.weight.mul_(0.5)
        return StageRecord(stage=self.name, summary="halved the final norm")

    def replay(self, model, record):
        raise AssertionError("not replayable")


def test_a_non_replayable_stage_resumes_from_its_checkpoint(recipe, tmp_path, monkeypatch):
    from compress.stages import STAGES

    monkeypatch.setitem(STAGES, "halve_norm", HalveNorm)
    body = yaml.safe_load(recipe.read_text())
    body["stages"].append({"halve_norm": {}})
    body["save"] = ["layer_removal"]  # halve_norm is saved anyway: it is the resume point
    recipe.write_text(yaml.safe_dump(body))
    crash_perplexity_at(monkeypatch, 3)
    with pytest.raises(RuntimeError):
        run_recipe(recipe, progress=False)
    assert HalveNorm.applied == 1 and (tmp_path / "run/checkpoints/halve_norm/model.safetensors").exists()
    restore_perplexity(monkeypatch)
    resumed = run_recipe(recipe, progress=False)
    assert HalveNorm.applied == 1  # loaded from its checkpoint, not redone
    assert [r["layers"] for r in resumed["rows"]] == [5, 3, 3]
    fresh_recipe = recipe.with_name("fresh.yaml")
    fresh_recipe.write_text(recipe.read_text().replace("output: run", "output: fresh"))
    fresh = run_recipe(fresh_recipe, progress=False)
    assert [r["ppl"] for r in resumed["rows"]] == pytest.approx([r["ppl"] for r in fresh["rows"]], rel=1e-9)
    assert fresh["rows"][2]["ppl"] != pytest.approx(fresh["rows"][1]["ppl"], rel=1e-3)


def test_size_metrics_bits():
    from compress.evaluate.suite import size_metrics

    model = tiny_model("llama", 2)
    m32 = size_metrics(model)
    m16 = size_metrics(model.to(torch.bfloat16))
    assert (m32["bits"], m16["bits"]) == (32, 16)
    assert m32["weight_bytes"] == 2 * m16["weight_bytes"] == 4 * m32["params"]
    assert (m32["bits_per_param"], m16["bits_per_param"]) == (32, 16)
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    assert size_metrics(model)["bits"] == 4


def test_mmlu_after_every_stage(recipe, tmp_path):
    mmlu = tmp_path / "mmlu/test"
    mmlu.mkdir(parents=True)
    for subject in ("astronomy", "anatomy"):
        (mmlu / f"{subject}_test.csv").write_text("".join(f"Q{i}?,a{i},b{i},c{i},d{i},{'ABCD'[i % 4]}\n" for i in range(5)))
    body = yaml.safe_load(recipe.read_text())
    body["evaluate"]["mmlu"] = {"path": "mmlu", "shots": 1, "limit": 3}
    recipe.write_text(yaml.safe_dump(body))
    report = run_recipe(recipe, progress=False)
    for row in report["rows"]:
        assert row["mmlu_questions"] == 6 and row["mmlu_exemplars"] == "first-k-of-test"
        assert 0 <= row["mmlu"] <= 1 and set(row["mmlu_per_subject"]) == {"astronomy", "anatomy"}
    assert "MMLU" in (tmp_path / "run/report.md").read_text()


@pytest.mark.parametrize("metric, png", [("heads", "heads-scores.png"), ("channels", "channels-scores.png")])
def test_score_command_for_heads_and_channels(metric, png, tiny_model_dir, text_file, tmp_path):
    result = CliRunner().invoke(main, ["score", str(tiny_model_dir), "--metric", metric, "--data", str(text_file),
                                       "--samples", "2", "--seq-len", "16", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "s/scores.json").read_text())["scores"]
    assert len(scores) == 5 and len(scores[0]) == (4 if metric == "heads" else 128)
    assert (tmp_path / "s" / png).stat().st_size > 1000


def test_strided_calibration_from_the_recipe(recipe, tiny_tokenizer, text_file):
    from compress.data.local import load_local_texts
    from compress.data.tokens import tokenize_documents
    from compress.pipeline import Pipeline
    from compress.recipe import load_recipe

    body = yaml.safe_load(recipe.read_text())
    body["calibration"]["sampling"] = "strided"
    recipe.write_text(yaml.safe_dump(body))
    batches = Pipeline(load_recipe(recipe), progress=False).calibration(tiny_tokenizer)
    stream = tokenize_documents(tiny_tokenizer, load_local_texts(text_file))
    assert torch.cat([b["input_ids"] for b in batches]).tolist() == [stream[16 * i:16 * (i + 1)].tolist()
                                                                      for i in range(4)]


def test_score_command_angular_block_prints_every_block_start(tiny_model_dir, text_file, tmp_path):
    args = ["score", str(tiny_model_dir), "--metric", "angular_block", "--data", str(text_file), "--samples", "3",
            "--seq-len", "16", "--sampling", "strided"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code != 0
    assert "--metric angular_block scores blocks of n consecutive layers: give n with --remove N (1..4)" \
        in refused.output
    result = CliRunner().invoke(main, [*args, "--remove", "2", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "s/scores.json").read_text())
    assert saved["n"] == 2 and len(saved["block_distances"]) == 4
    first = min(range(4), key=lambda i: saved["block_distances"][i])
    assert saved["block"] == [first, first + 2]
    from compress.data.local import load_local_texts
    from compress.data.tokens import calibration_batches, tokenize_documents
    from compress.importance.angular_block import angular_block_distances
    from compress.model_io import load_model

    model, tok = load_model(str(tiny_model_dir), dtype=torch.float32, device=torch.device("cpu"))
    strided = calibration_batches(tokenize_documents(tok, load_local_texts(text_file)), 3, 16, 0, 1, "strided")
    assert saved["block_distances"] == pytest.approx(angular_block_distances(model, strided, 2, False), abs=1e-6)
    assert f"block removed: layers {first}..{first + 1} ([{first}, {first + 2}))" in result.output
    assert "plot:" not in result.output


def _with(recipe: Path, **changes) -> Path:
    body = yaml.safe_load(recipe.read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        target = body["evaluate"] if section == "perplexity" else body
        if field:
            target[section][field] = value
        else:
            target[section] = value
    recipe.write_text(yaml.safe_dump(body))
    return recipe


def test_report_and_stage_records_name_the_data_sources(recipe, tmp_path, text_file):
    """A json-builder calibration set (real local files, read by `datasets`) and its label-free name."""
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p in text_file.read_text().split(". ")))
    _with(recipe, calibration={"dataset": "json", "data_files": ["docs.jsonl"], "samples": 4, "seq_len": 16})
    report = run_recipe(recipe, progress=False)
    described = f"json:{jsonl}; 4 x 16 tokens, random"
    assert report["data"] == {"calibration": described,
                              "evaluate.perplexity": f"{text_file}; first 256 tokens, seq_len 32, stride 32"}
    assert report["stages"][0]["calibration_data"] == described
    assert report["rows"][0]["ppl_data"] == "book.txt"


def test_bos_per_window_perplexity_scores_every_text_token(recipe, tiny_model_dir, tiny_tokenizer):
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, bos_token="<eos>",
                            eos_token="<eos>", pad_token="<eos>").save_pretrained(tiny_model_dir)
    _with(recipe, perplexity__bos_per_window=True)
    rows = run_recipe(recipe, progress=False)["rows"]
    assert [r["ppl_tokens"] for r in rows] == [256, 256]  # all 256 text tokens; 248 without a BOS
    assert rows[0]["ppl_data"] == "book.txt (BOS per window)"


def test_a_tokenizer_without_bos_stops_the_run_before_any_evaluation(recipe, tmp_path):
    _with(recipe, perplexity__bos_per_window=True)
    with pytest.raises(CompressError, match=r"^evaluate\.perplexity\.bos_per_window: true, but the tokenizer "
                                            r"has no BOS token"):
        run_recipe(recipe, progress=False)
    assert not list(tmp_path.glob("**/state/00-baseline.json"))  # a run without the option writes one
