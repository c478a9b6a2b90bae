"""Fidelity vs the baseline: the top-k KL math, the on-disk store, and the rows a run reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress.compare import compare_runs
from compress.data.tokens import tokenize_documents
from compress.errors import CompressError
from compress.evaluate.fidelity import full_kl, topk_kl, topk_summary
from compress.evaluate.perplexity import _batches, make_windows
from compress.pipeline import run_recipe
from compress.recipe import load_recipe
from compress.surgery import decoder_layers


def random_logp(n: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(n, vocab, generator=gen), dim=-1)


def test_topk_kl_with_k_equal_to_the_vocabulary_is_the_full_kl():
    p, q = random_logp(50, 97, 0), random_logp(50, 97, 1)
    ids, top, rest = topk_summary(p, 97)
    assert torch.isinf(rest).all()  # nothing outside the top-k
    torch.testing.assert_close(topk_kl(ids, top, rest, q), full_kl(p, q), rtol=1e-6, atol=1e-9)


def test_topk_kl_is_a_lower_bound_and_zero_against_itself():
    p, q = random_logp(50, 97, 0), random_logp(50, 97, 1)
    for k in (1, 4, 16, 64):
        ids, top, rest = topk_summary(p, k)
        kl = topk_kl(ids, top, rest, q)
        assert (kl <= full_kl(p, q) + 1e-9).all() and (kl >= 0).all()
        assert float(topk_kl(ids, top, rest, p).abs().max()) < 1e-6
    # the rest bucket matters: q that moves mass out of p's top-4 is penalised
    ids, top, rest = topk_summary(p, 4)
    by_hand = (top.exp() * (top - q.gather(-1, ids))).sum(-1).double()
    q_rest = torch.log1p(-q.gather(-1, ids).exp().sum(-1)).double()
    by_hand += rest.exp().double() * (rest.double() - q_rest)
    torch.testing.assert_close(topk_kl(ids, top, rest, q), by_hand, rtol=1e-5, atol=1e-7)


def fidelity_recipe(tmp_path: Path, model_dir: Path, text: Path, output: str, **evaluate) -> Path:
    body = {
        "model": str(model_dir), "dtype": "float32", "device": "cpu", "output": output,
        "calibration": {"path": str(text), "samples": 4, "seq_len": 16},
        "evaluate": {"perplexity": {"path": str(text), "seq_len": 32, "max_tokens": 256},
                     "fidelity": {"top_k": 320}, **evaluate},
        "stages": [{"layer_removal": {"layers": [1, 3]}}],
    }
    p = tmp_path / f"{output}.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


def independent_fidelity(model_dir: Path, text: Path, skip: list[int]) -> dict[str, float]:
    """KL / agreement / Δ log-prob of the model with ``skip`` layers bypassed vs the original,
    computed from scratch: full vocabulary, every scored position of the perplexity windows."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    tokens = tokenize_documents(tok, [text.read_text()], max_tokens=256)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    kls, agree, dlogp, n = [], 0, 0.0, 0
    for batch in _batches(make_windows(tokens.numel(), 32, 32), 1):
        (w,) = batch
        ids = tokens[w.begin : w.end][None]
        with torch.no_grad():
            p = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            hooks = [decoder_layers(model)[i].register_forward_hook(lambda m, a, o: a[0]) for i in skip]
            q = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            for h in hooks:
                h.remove()
        first = w.target_from - w.begin - 1
        p, q, target = p[first:], q[first:], ids[0, 1:][first:]
        kls.append(full_kl(p, q))
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        dlogp += float((q.gather(-1, target[:, None]) - p.gather(-1, target[:, None])).sum())
        n += len(target)
    kl = torch.cat(kls)
    return {"kl_mean": float(kl.mean()), "kl_median": float(kl.median()), "top1_agree": agree / n,
            "dlogp_ref": dlogp / n, "positions": n}


@pytest.mark.parametrize("layerwise", [False, True])
def test_run_reports_kl_agreement_and_dlogp_equal_to_an_independent_computation(
        tmp_path, tiny_model_dir, text_file, layerwise):
    recipe = fidelity_recipe(tmp_path, tiny_model_dir, text_file, "run")
    if layerwise:
        body = yaml.safe_load(recipe.read_text())
        body["layerwise"] = True
        recipe.write_text(yaml.safe_dump(body))
    report = run_recipe(recipe, progress=False)
    base, pruned = report["rows"]
    assert base["kl_mean"] == pytest.approx(0.0, abs=1e-9) and base["top1_agree"] == 1.0
    assert base["dlogp_ref"] == 0.0 and base["fidelity_store_bytes"] > 0
    ref = independent_fidelity(tiny_model_dir, text_file, skip=[1, 3])
    assert pruned["fidelity_positions"] == ref["positions"] == base["ppl_tokens"]
    assert pruned["kl_mean"] == pytest.approx(ref["kl_mean"], rel=1e-4)
    assert pruned["kl_median"] == pytest.approx(ref["kl_median"], rel=1e-3)
    assert pruned["top1_agree"] == pytest.approx(ref["top1_agree"], abs=1e-12)
    assert pruned["dlogp_ref"] == pytest.approx(ref["dlogp_ref"], rel=1e-4)
    assert pruned["kl_mean"] > 0.01 and pruned["top1_agree"] < 1.0  # the signal moved
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| ppl | KL | top-1 |" in md and "| baseline | 5 |" in md and "| 0.0000 | 1.000 |" in md


def test_store_is_built_once_and_reused_on_resume(tmp_path, tiny_model_dir, text_file, monkeypatch):
    recipe = fidelity_recipe(tmp_path, tiny_model_dir, text_file, "run", fidelity={"top_k": 8})
    first = run_recipe(recipe, progress=False)
    store = tmp_path / "run" / "state" / "baseline-logits"
    meta = json.loads((store / "meta.json").read_text())
    assert meta["top_k"] == 8 and meta["positions"] == first["rows"][0]["ppl_tokens"]
    assert first["rows"][0]["fidelity_store_bytes"] == meta["positions"] * (8 * 8 + 16)
    state = tmp_path / "run" / "state" / "01-layer_removal.json"
    entry = json.loads(state.read_text())
    entry.pop("metrics")  # the stage's evaluation "crashed": rerun it against the same store
    state.write_text(json.dumps(entry))
    monkeypatch.setattr("compress.pipeline.StoreWriter", lambda *a, **k: pytest.fail("store rebuilt"))
    again = run_recipe(recipe, progress=False)
    assert again["rows"][1]["kl_mean"] == pytest.approx(first["rows"][1]["kl_mean"], rel=1e-12)
    assert 0 < first["rows"][1]["kl_mean"]


def test_compare_plots_kl_against_weight_memory(tmp_path, tiny_model_dir, text_file):
    run_recipe(fidelity_recipe(tmp_path, tiny_model_dir, text_file, "a"), progress=False)
    md = compare_runs([tmp_path / "a"], tmp_path / "cmp")
    assert (tmp_path / "cmp" / "kl_vs_weights.png").stat().st_size > 1000
    assert "| ppl | KL | top-1 |" in md.splitlines()[0]


@pytest.mark.parametrize("evaluate, expected", [
    ({"perplexity": None}, "evaluate.fidelity: is measured on the perplexity text; add evaluate.perplexity"),
    ({"after": ["every_stage"]}, "evaluate.fidelity: compares with the baseline; add baseline to evaluate.after"),
    ({"fidelity": {"top_k": 0}}, "evaluate.fidelity.top_k: Input should be greater than or equal to 1"),
])
def test_fidelity_recipe_errors(tmp_path, tiny_model_dir, text_file, evaluate, expected):
    recipe = fidelity_recipe(tmp_path, tiny_model_dir, text_file, "run")
    body = yaml.safe_load(recipe.read_text())
    body["evaluate"].update(evaluate)
    body["evaluate"] = {k: v for k, v in body["evaluate"].items() if v is not None}
    recipe.write_text(yaml.safe_dump(body))
    with pytest.raises(CompressError, match=expected.replace("(", r"\(")):
        load_recipe(recipe)
