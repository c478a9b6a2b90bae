"""Stage heal: the loss, the teacher store, LoRA merge, full training, resume after kill -9, and
the recipe's order rules. Tiny models built here (tests/conftest.py)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from compress.data.tokens import batched
from compress.errors import CompressError
from compress.evaluate.fidelity import full_kl, topk_kl, topk_summary
from compress.heal.adapters import layers_next_to_removed, merge_lora, target_names, wrap_lora
from compress.heal.loss import heal_loss, topk_kl_loss
from compress.heal.schedule import lr_factor, micro_batch
from compress.heal.teacher import build_teacher_store
from compress.recipe import load_recipe
from compress.stages.base import StageContext
from compress.stages.heal import Heal, HealConfig
from compress.surgery import remove_layers

from conftest import tiny_model

CPU = torch.device("cpu")
LOG = logging.getLogger("test")


# ---- the loss (pure) ---------------------------------------------------------------------------

def _distributions(n=12, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(3 * torch.randn(n, vocab, generator=g), -1)
    student = 3 * torch.randn(n, vocab, generator=g)
    return teacher, student


def test_topk_loss_with_k_equal_to_vocab_is_the_full_kl():
    teacher, student = _distributions()
    ids, top, rest = topk_summary(teacher, 50)
    loss = topk_kl_loss(student, ids, top, rest)
    expected = full_kl(teacher, torch.log_softmax(student, -1))
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 5, 49])
def test_topk_loss_is_the_fidelity_metric_and_below_the_full_kl(k):
    teacher, student = _distributions(seed=k)
    ids, top, rest = topk_summary(teacher, k)
    loss = topk_kl_loss(student, ids, top, rest)
    q = torch.log_softmax(student, -1)
    torch.testing.assert_close(loss.double(), topk_kl(ids, top, rest, q), atol=1e-5, rtol=1e-4)
    assert bool((loss.double() <= full_kl(teacher, q) * (1 + 1e-5)).all())  # float32 rounding


def test_loss_gradient_is_finite_and_zero_at_the_teacher():
    teacher, _ = _distributions()
    ids, top, rest = topk_summary(teacher, 8)
    student = teacher.clone().requires_grad_(True)  # logits = the teacher's log-probs: KL 0
    loss = topk_kl_loss(student, ids, top, rest).mean()
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(student.grad).all() and float(student.grad.abs().max()) < 1e-6


def test_lm_weight_mixes_kl_and_cross_entropy():
    teacher, student = _distributions()
    ids, top, rest = topk_summary(teacher, 8)
    target = torch.arange(12) % 50
    rows = {"top_ids": ids, "top_logp": top, "rest_logp": rest, "target": target}
    out = heal_loss(student, rows, 0.25)
    ce = torch.nn.functional.cross_entropy(student, target)
    assert float(out["loss"]) == pytest.approx(0.75 * float(out["kl"]) + 0.25 * float(ce), rel=1e-5)


def test_schedule_warms_up_then_decays_to_the_floor():
    assert [round(lr_factor(i, 4, 20), 4) for i in (0, 1, 3)] == [0.25, 0.5, 1.0]
    assert lr_factor(4, 4, 20) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20) == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, min_ratio=0.1) == pytest.approx(0.1)


def test_micro_batches_cover_every_window_once_per_epoch():
    first = [i for p in range(3) for i in micro_batch(p, 10, 4, seed=3)]  # 4 + 4 + 2
    second = [i for p in range(3, 6) for i in micro_batch(p, 10, 4, seed=3)]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second  # each epoch its own order


def test_layers_next_to_removed():
    assert layers_next_to_removed([0, 1, 4, 5, 6], 7) == [1, 2]
    assert layers_next_to_removed([1, 2, 3], 5) == [0, 2]  # the first and the last two went


# ---- the stage on a tiny model ------------------------------------------------------------------

def sharp_tiny(layers=5):
    """A tiny Llama with larger weights, so its next-token distributions are peaked and removing a
    layer changes them clearly (a fresh one predicts nearly uniformly)."""
    model = tiny_model("llama", layers)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return model


def held_out_kl(teacher_logp, model, held):
    with torch.no_grad():
        return float(full_kl(teacher_logp, torch.log_softmax(model(held).logits, -1)).mean())


def heal_setup(tmp_path, top_k, windows=96):
    """Teacher, student (layer 2 removed), stage context. Token ids from the first 64 of the 320: a
    domain that 96 windows cover well enough for what they teach to hold on other windows."""
    teacher = sharp_tiny()
    g = torch.Generator().manual_seed(1)
    train = torch.randint(0, 64, (windows, 32), generator=g)
    held = torch.randint(0, 64, (8, 32), generator=g)  # never seen in training (nor in validation)
    store = build_teacher_store(teacher, train, tmp_path / "teacher", top_k, CPU, progress=False)
    with torch.no_grad():
        teacher_logp = torch.log_softmax(teacher(held).logits, -1)
    student = copy.deepcopy(teacher)
    remove_layers(student, [2])
    ctx = StageContext(batched(train, 4), None, CPU, [0, 1, 3, 4], LOG, progress=False, teacher=store,
                       work_folder=tmp_path / "work", original_num_layers=5)
    return student, ctx, teacher_logp, held


@pytest.mark.parametrize("method,limit", [("lora", 0.85), ("full", 0.95)])  # measured: -24%, -9%
def test_distillation_lowers_the_kl_to_the_teacher_on_held_out_text(tmp_path, method, limit):
    student, ctx, teacher_logp, held = heal_setup(tmp_path, top_k=320)
    before = held_out_kl(teacher_logp, student, held)
    record = Heal(HealConfig(method=method, steps=60, lr=3e-3, rank=8, top_k=320, validation_samples=4,
                             eval_every=20)).apply(student, ctx)
    healed = record.new_model
    after = held_out_kl(teacher_logp, healed, held)
    assert after < limit * before, (before, after)
    d = record.details
    assert d["final_val_kl"] < d["initial_val_kl"]
    assert d["steps"] == 60 and d["tokens_seen"] == 60 * 4 * 32
    assert d["teacher_store_bytes"] == 96 * 31 * (8 * 320 + 16)  # 96 windows x 31 positions x (8k+16)
    assert d["curve"]["val_step"] == [0, 20, 40, 60]
    assert type(healed).__name__ == "LlamaForCausalLM"
    assert not any(p.requires_grad for p in healed.parameters())


def test_merged_lora_gives_the_peft_models_logits_and_reloads_without_peft(tmp_path):
    from transformers import AutoModelForCausalLM

    model = sharp_tiny(3)
    names = target_names(model, [0, 1, 2], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    wrapped = wrap_lora(model, names, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # give the adapters non-zero updates (B starts at zero)
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    wrapped.eval()
    with torch.no_grad():
        peft_logits = wrapped(ids).logits
    merged = merge_lora(wrapped)
    with torch.no_grad():
        merged_logits = merged(ids).logits
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert float((merged_logits - sharp_tiny(3)(ids).logits).abs().max()) > 1e-2  # the adapters did something
    merged.save_pretrained(tmp_path / "ckpt")
    keys = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert "peft" not in json.dumps(keys).lower()
    from safetensors.torch import load_file
    assert not [k for k in load_file(tmp_path / "ckpt" / "model.safetensors") if "lora" in k]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, merged_logits)


def test_full_method_trains_only_the_layers_next_to_the_removed_one(tmp_path):
    student, ctx, _, _ = heal_setup(tmp_path, top_k=16, windows=12)
    before = {n: p.clone() for n, p in student.named_parameters()}
    record = Heal(HealConfig(method="full", layers="next_to_removed", steps=3, lr=1e-3, top_k=16,
                             validation_samples=2)).apply(student, ctx)
    changed = {n for n, p in record.new_model.named_parameters() if not torch.equal(p, before[n])}
    assert record.details["layers"] == [1, 2]  # original 1 and 3 sit beside the removed layer 2
    assert changed and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in changed)
    assert not any("norm" in n for n in changed)  # only the projections of target_modules


def test_unknown_target_module_names_the_key_and_lists_the_real_ones(tmp_path):
    student, ctx, _, _ = heal_setup(tmp_path, top_k=16, windows=12)
    with pytest.raises(CompressError, match=r"heal.target_modules: \['qkv'\] are not linear modules of this "
                                            r"model's layers; its layers have \['down_proj', 'gate_proj'"):
        Heal(HealConfig(target_modules=["qkv"], steps=1, top_k=16, validation_samples=2)).apply(student, ctx)


# ---- recipes: order, validation ----------------------------------------------------------------

def write_recipe(tmp_path, model_dir, text_file, stages, **extra) -> Path:
    body = {"model": str(model_dir), "dtype": "float32", "device": "cpu", "output": str(tmp_path / "out"),
            "calibration": {"path": str(text_file), "samples": 10, "seq_len": 16, "sampling": "strided"},
            "evaluate": {"after": ["baseline", "every_stage"],
                         "perplexity": {"path": str(text_file), "seq_len": 32, "max_tokens": 256}},
            "stages": stages, **extra}
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


def test_heal_before_any_pruning_stage_is_refused(tmp_path, tiny_model_dir, text_file):
    p = write_recipe(tmp_path, tiny_model_dir, text_file, [{"heal": {"steps": 2}},
                                                           {"layer_removal": {"metric": "bi", "remove": 1}}])
    with pytest.raises(CompressError) as e:
        load_recipe(p)
    assert ("stages[0].heal: comes before any pruning stage; it trains the pruned model toward the model as "
            "loaded: put it after one of ['head_pruning', 'layer_merge', 'layer_removal', 'width_pruning']") in str(e.value)


@pytest.mark.parametrize("quant", [{"gptq": {"bits": 4}}, {"bnb4": {}}])
def test_heal_after_quantization_is_refused(tmp_path, tiny_model_dir, text_file, quant):
    p = write_recipe(tmp_path, tiny_model_dir, text_file, [{"layer_removal": {"metric": "bi", "remove": 1}},
                                                           quant, {"heal": {"steps": 2}}])
    with pytest.raises(CompressError) as e:
        load_recipe(p)
    name = next(iter(quant))
    assert f"stages[2].heal: comes after quantization stage {name!r}; quantization must be the last stage" in str(e.value)


def test_heal_options_are_checked(tmp_path, tiny_model_dir, text_file):
    p = write_recipe(tmp_path, tiny_model_dir, text_file, [
        {"layer_removal": {"metric": "bi", "remove": 1}},
        {"heal": {"steps": 2, "epochs": 1.0, "method": "qlora", "calibration": {"path": str(text_file), "samples": 4},
                  "validation_samples": 4}}])
    with pytest.raises(CompressError) as e:
        load_recipe(p)
    text = str(e.value)
    assert "stages[1].heal.method: Input should be 'lora' or 'full'" in text


# ---- the pipeline: teacher store, report, kill -9 and resume ----------------------------------

def run_cli(recipe: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "compress.cli", "run", str(recipe), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)


def tensor_hashes(ckpt: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
            for k, v in sorted(load_file(ckpt / "model.safetensors").items())}


def test_kill_during_heal_resumes_to_the_same_weights(tmp_path, tiny_model_dir, text_file):
    stages = [{"layer_removal": {"metric": "bi", "remove": 1}},
              {"heal": {"steps": 6, "checkpoint_every": 2, "eval_every": 2, "batch_size": 2, "top_k": 8,
                        "validation_samples": 2, "dropout": 0.1}}]
    (tmp_path / "ref").mkdir()
    (tmp_path / "crash").mkdir()
    ref = write_recipe(tmp_path / "ref", tiny_model_dir, text_file, stages)
    done = run_cli(ref)
    assert done.returncode == 0, done.stderr[-3000:]
    crash = write_recipe(tmp_path / "crash", tiny_model_dir, text_file, stages)
    killed = run_cli(crash, {"COMPRESS_CRASH_AT": "heal:2"})  # killed right after the step-4 checkpoint
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run_cli(crash)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "heal: resuming at step 4 of 6" in resumed.stderr
    ref_out, out = tmp_path / "ref" / "out", tmp_path / "crash" / "out"
    assert tensor_hashes(out / "checkpoints" / "heal") == tensor_hashes(ref_out / "checkpoints" / "heal")
    report = json.loads((out / "report.json").read_text())
    heal = next(s for s in report["stages"] if s["name"] == "heal")
    ref_heal = next(s for s in json.loads((ref_out / "report.json").read_text())["stages"] if s["name"] == "heal")
    assert heal["details"]["curve"] == ref_heal["details"]["curve"]
    assert heal["details"]["resumed_at_step"] == 4 and heal["details"]["steps"] == 6
    assert heal["details"]["teacher_store_bytes"] == 10 * 15 * (8 * 8 + 16)
    assert (out / "plots" / "heal-loss.png").stat().st_size > 0
    assert "plots/heal-loss.png" in (out / "report.md").read_text()
    assert [r["ppl"] for r in report["rows"]] == [r["ppl"] for r in json.loads((ref_out / "report.json").read_text())["rows"]]
    config = json.loads((out / "checkpoints" / "heal" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and "peft" not in json.dumps(config).lower()


def test_heal_calibration_is_not_held_as_hidden_states(tmp_path, tiny_model_dir, text_file, monkeypatch):
    """The memory check counts a float32 hidden state per calibration token (what scoring keeps);
    heal reads its windows batch by batch, so a large heal set passes while the same size as the
    recipe's calibration (scoring's) is refused."""
    import compress.model_io as model_io
    from compress.model_io import model_facts, read_config
    from compress.recipe import check_against_model

    monkeypatch.setattr(model_io, "available_bytes", lambda device: 2**30)
    big = {"path": str(text_file), "samples": 400_000, "seq_len": 256, "sampling": "strided"}
    facts = model_facts(read_config(str(tiny_model_dir), None, False))
    p = write_recipe(tmp_path, tiny_model_dir, text_file, [{"layer_removal": {"metric": "bi", "remove": 1}},
                                                           {"heal": {"steps": 2, "calibration": big}}])
    check_against_model(load_recipe(p), facts)  # no error
    p = write_recipe(tmp_path, tiny_model_dir, text_file, [{"layer_removal": {"metric": "bi", "remove": 1}}],
                     calibration=big)
    with pytest.raises(CompressError, match=r"calibration.samples: 400000 samples x 256 tokens need about 25.2 GiB"):
        check_against_model(load_recipe(p), facts)
