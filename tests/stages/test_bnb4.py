"""Stage bnb4: bitsandbytes NF4/FP4 on a (pruned) model; the 4-bit checkpoint reloads exactly."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from compress.errors import CompressError
from compress.evaluate.suite import size_metrics
from compress.pipeline import run_recipe
from compress.recipe import check_against_model, load_recipe
from compress.stages.base import ModelFacts, StageContext
from compress.stages.bnb4 import BnB4, BnB4Config
from compress.surgery import remove_layers
from conftest import crash_perplexity_at, restore_perplexity, tiny_model

pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the test extra: pip install -e '.[test]'")
IDS = torch.randint(1, 320, (2, 10), generator=torch.Generator().manual_seed(9))


def ctx() -> StageContext:
    return StageContext([], None, torch.device("cpu"), [], logging.getLogger("t"), progress=False)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantized_pruned_model_reloads_with_identical_logits(quant_type, tmp_path):
    model = tiny_model("qwen3", 4)
    remove_layers(model, [1])
    record = BnB4(BnB4Config(quant_type=quant_type)).apply(model, ctx())
    q = record.new_model
    assert type(q.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert q.config.num_hidden_layers == 3 and len(q.model.layers) == 3 and len(q.config.layer_types) == 3
    q.save_pretrained(tmp_path)  # before any forward, as the pipeline does (see BnB4's docstring)
    with torch.no_grad():
        before, after = model(IDS).logits, q(IDS).logits
    assert 0 < (after - before).abs().max() < 1.0  # quantized: close to, not equal to, the float model
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (cfg["quant_method"], cfg["bnb_4bit_quant_type"], cfg["load_in_4bit"]) == ("bitsandbytes", quant_type, True)
    reloaded = BnB4.load(tmp_path, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, after, rtol=0, atol=0)
    m = size_metrics(reloaded)
    assert m["bits"] == 4 and m["params"] == size_metrics(model)["params"]
    assert m["weight_bytes"] < 0.6 * size_metrics(model)["weight_bytes"]


def test_saving_after_a_forward_pass_changes_the_checkpoint_on_cpu(tmp_path):
    """Pins the bitsandbytes CPU behaviour the pipeline's save order works around."""
    q = BnB4(BnB4Config()).apply(tiny_model("llama", 2), ctx()).new_model
    q.save_pretrained(tmp_path / "before")
    with torch.no_grad():
        logits = q(IDS).logits
    q.save_pretrained(tmp_path / "after")
    with torch.no_grad():
        exact = BnB4.load(tmp_path / "before", torch.device("cpu"))(IDS).logits
        drifted = BnB4.load(tmp_path / "after", torch.device("cpu"))(IDS).logits
    assert torch.equal(exact, logits)
    assert not torch.equal(drifted, logits)


def test_pipeline_prune_then_bnb4_resumes_from_the_4bit_checkpoint(tmp_path, tiny_model_dir, text_file, monkeypatch):
    body = {"model": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "output": "run",
            "calibration": {"path": str(text_file), "samples": 2, "seq_len": 16},
            "evaluate": {"perplexity": {"path": str(text_file), "seq_len": 32, "max_tokens": 256}},
            "stages": [{"layer_removal": {"remove": 1}}, {"bnb4": {"quant_type": "nf4"}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    crash_perplexity_at(monkeypatch, 3)
    with pytest.raises(RuntimeError):
        run_recipe(tmp_path / "r.yaml", progress=False)
    restore_perplexity(monkeypatch)
    monkeypatch.setattr(BnB4, "apply", lambda *a: pytest.fail("bnb4 redone instead of loaded"))
    report = run_recipe(tmp_path / "r.yaml", progress=False)
    base, pruned, quant = report["rows"]
    assert (pruned["layers"], quant["layers"], quant["bits"]) == (4, 4, 4)
    assert quant["weight_bytes"] < 0.6 * pruned["weight_bytes"] and quant["disk_bytes"] > 0
    assert quant["ppl"] == pytest.approx(pruned["ppl"], rel=0.5)
    ckpt = tmp_path / "run/checkpoints/bnb4"
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu")
    assert reloaded.config.num_hidden_layers == 4
    assert json.loads((ckpt / "compress.json").read_text())["stages"][1]["details"]["backend"].startswith("bitsandbytes")


def test_order_and_input_checks(tmp_path, tiny_model_dir):
    body = {"model": str(tiny_model_dir), "output": "o", "stages": [{"bnb4": {}}, {"layer_removal": {"layers": [0]}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    with pytest.raises(CompressError, match=r"stages\[1\].layer_removal: comes after quantization stage 'bnb4'"):
        load_recipe(tmp_path / "r.yaml")
    body["stages"] = [{"bnb4": {}}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    with pytest.raises(CompressError, match="already quantized"):
        check_against_model(load_recipe(tmp_path / "r.yaml"), ModelFacts("llama", 5, quantized=True))
