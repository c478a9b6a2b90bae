"""GGUF files made by llama.cpp's own tools from compress checkpoints, loaded in llama.cpp and compared with
transformers on the checkpoint they came from (`compress verify --engine llamacpp`).

Needs the llama.cpp environment (`bash scripts/gguf-env.sh`; .ci/run builds it, cached by a version stamp).
Without it these tests skip with that reason, except under COMPRESS_REQUIRE_GGUF=1 (CI), where a missing
environment is a failure. Checkpoints are made once per module (calibration 8 x 128 tokens)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compress.gguf.env import missing_reason
from compress.pipeline import run_recipe
from compress.verify.verify import VerifyOptions, verify_checkpoints

pytestmark = [pytest.mark.gguf, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def llama_env() -> None:
    why = missing_reason()
    if why is not None:
        if os.environ.get("COMPRESS_REQUIRE_GGUF") == "1":
            pytest.fail(why)
        pytest.skip(why)


def _run(folder: Path, name: str, model: Path, stages: list[dict], assets: Path, save: list[str],
         evaluate: dict | None = None) -> Path:
    body = {"model": str(model), "dtype": "float32", "device": "cpu", "output": str(folder / name),
            "calibration": {"path": str(assets / "books" / "austen-emma.txt"), "samples": 8, "seq_len": 128},
            "evaluate": evaluate or {"after": []}, "stages": stages, "save": save}
    recipe = folder / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(body))
    run_recipe(recipe, progress=False)
    return folder / name


def _export(checkpoint: Path, quant: str, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = checkpoint.parent / f"{checkpoint.name}-{quant}{'-imatrix' if extra else ''}.gguf"
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "export", str(checkpoint), "--format", "gguf",
                           "--quant", quant, "--out", str(out), *extra], capture_output=True, text=True)
    return proc, out


def _tensor_names(gguf: Path) -> set[str]:
    """The GGUF's tensor names, read with llama.cpp's own gguf-py (the environment's converter copy)."""
    from compress.gguf.env import gguf_reader

    return {t.name for t in gguf_reader()(str(gguf)).tensors}


def _metadata(gguf: Path) -> dict:
    """The GGUF's scalar metadata (llama.cpp's gguf-py)."""
    from compress.gguf.env import gguf_reader

    fields = gguf_reader()(str(gguf)).fields
    return {k: f.parts[f.data[0]].tolist()[0] for k, f in fields.items() if len(f.data) == 1 and
            getattr(f.parts[f.data[0]], "size", 0) == 1}


def _verify(gguf: Path, reference: Path | None = None):
    [r] = verify_checkpoints([gguf], VerifyOptions(engine="llamacpp", reference=reference, tokens=16))
    return r


@pytest.fixture(scope="module")
def bi7(tmp_path_factory, assets) -> Path:
    folder = tmp_path_factory.mktemp("gguf")
    run = _run(folder, "bi7", assets / "models" / "smollm2-135m-instruct",
               [{"layer_removal": {"metric": "bi", "remove": 7}}], assets, save=["layer_removal"])
    return run / "checkpoints" / "layer_removal"


def test_bi7_f16_gives_transformers_greedy_tokens(bi7):
    proc, out = _export(bi7, "f16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(Path(f"{out}.compress.json").read_text())
    assert record["quant"] == "f16" and record["source"]["folder"] == str(bi7.resolve())
    assert record["source"]["num_hidden_layers"] == 23 and record["source"]["compress"]["kept_layers"]
    r = _verify(out)  # the reference comes from the sidecar
    assert r.ok and r.verdict.same_tokens and r.quantization is None, r.to_json()
    assert r.reference == str(bi7.resolve()) and r.verdict.top1_agree == 1.0


def test_bi7_q4_k_m_passes_the_quantized_thresholds(bi7):
    proc, out = _export(bi7, "q4_k_m")
    assert proc.returncode == 0, proc.stderr[-2000:]
    f16 = bi7.parent / f"{bi7.name}-f16.gguf"
    if f16.exists():
        assert out.stat().st_size < 0.5 * f16.stat().st_size
    r = _verify(out)
    assert r.quantization == "q4_k_m" and r.ok, r.to_json()
    assert r.verdict.max_dlogp > 0  # another function than the float one


def test_recipe_stage_writes_the_gguf_beside_the_checkpoints_and_llama_cpp_rows_match_the_hf_ones(
        tmp_path, assets):
    """`gguf: {quant: f16}` after layer_removal: its row is computed by llama.cpp on the file, on the same
    perplexity windows as the HF rows; f16 weights give the HF row's perplexity to within 1%, its KL against
    the baseline and top-1 agreement to within 0.01 (the baseline store is fed llama.cpp's log-probs), and
    llama.cpp's own prefill / decode speed; the provenance records the file."""
    evaluate = {"after": ["baseline", "every_stage"], "fidelity": {"top_k": 8},
                "perplexity": {"path": str(assets / "books" / "austen-prideprejudice.txt"), "seq_len": 128,
                               "max_tokens": 1024},
                "efficiency": {"prompt_tokens": 16, "new_tokens": 8, "repeats": 1, "fast_path": False}}
    run = _run(tmp_path, "stage", assets / "models" / "smollm2-135m-instruct",
               [{"layer_removal": {"metric": "bi", "remove": 7}}, {"gguf": {"quant": "f16"}}], assets,
               save=["layer_removal"], evaluate=evaluate)
    report = json.loads((run / "report.json").read_text())
    hf, gg = report["rows"][1], report["rows"][2]
    assert gg["step"] == "gguf" and gg["engine"] == "llama.cpp"
    assert gg["ppl_tokens"] == hf["ppl_tokens"]
    assert abs(gg["ppl"] - hf["ppl"]) / hf["ppl"] < 0.01, (gg["ppl"], hf["ppl"])
    assert hf["kl_mean"] > 0.1  # 7 layers removed: far from the baseline, so the comparison below means something
    assert abs(gg["kl_mean"] - hf["kl_mean"]) < 0.01 and abs(gg["top1_agree"] - hf["top1_agree"]) < 0.01, (gg, hf)
    assert gg["decode_tok_s"] > 0 and gg["prefill_ms"] > 0 and "llama.cpp" in gg["latency_setting"]
    folder = run / "checkpoints" / "gguf"
    gguf = folder / "model-f16.gguf"
    assert gg["weight_bytes"] == gguf.stat().st_size
    prov = json.loads((folder / "compress.json").read_text())
    assert prov["stages"][-1]["details"]["file"] == "model-f16.gguf"
    assert prov["stages"][-1]["details"]["gguf_bytes"] == gguf.stat().st_size
    r = _verify(gguf)  # the sidecar names the float model beside it
    assert r.ok and r.verdict.same_tokens and r.reference == str(folder.resolve())


def test_stage_with_an_importance_matrix_resumes_after_a_kill_without_redoing_the_export(tmp_path, assets):
    """`gguf: {quant: q4_k_m, imatrix: true}`: the stage records the importance matrix it made from the recipe's
    calibration windows; killed (SIGKILL) after the GGUF was written and recorded but before its row was stored,
    the rerun reuses that file (same bytes, no second export) and measures the row on it: the perplexity equals
    llama.cpp's on the file computed here independently."""
    from transformers import AutoTokenizer

    from compress.evaluate.suite import PerplexityConfig, perplexity_tokens
    from compress.gguf.evaluate import gguf_perplexity

    ppl = {"path": str(assets / "books" / "austen-prideprejudice.txt"), "seq_len": 128, "max_tokens": 512}
    body = {"model": str(assets / "models" / "smollm2-135m-instruct"), "dtype": "float32", "device": "cpu",
            "output": str(tmp_path / "run"),
            "calibration": {"path": str(assets / "books" / "austen-emma.txt"), "samples": 8, "seq_len": 128},
            "evaluate": {"after": ["baseline", "every_stage"], "perplexity": ppl},
            "stages": [{"layer_removal": {"metric": "bi", "remove": 7}}, {"gguf": {"quant": "q4_k_m", "imatrix": True}}],
            "save": []}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(body))
    cmd = [sys.executable, "-m", "compress.cli", "run", str(recipe), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    # evaluations: baseline (1), layer_removal (2), gguf (3)
    killed = subprocess.run(cmd, capture_output=True, text=True, env={**env, "COMPRESS_CRASH_AT": "evaluation:3"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    run = tmp_path / "run"
    [left] = [p for p in tmp_path.rglob("model-q4_k_m.gguf") if "checkpoints" in p.parts]  # the unfinished run's
    before = left.stat()
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    gguf = run / "checkpoints" / "gguf" / "model-q4_k_m.gguf"
    after = gguf.stat()  # the same file (a folder rename keeps it), not a second export
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    report = json.loads((run / "report.json").read_text())
    row = report["rows"][-1]
    assert row["step"] == "gguf" and row["engine"] == "llama.cpp" and row["gguf_quant"] == "q4_k_m"
    tok = AutoTokenizer.from_pretrained(assets / "models" / "smollm2-135m-instruct")
    tokens = perplexity_tokens(tok, PerplexityConfig(**ppl))
    assert abs(row["ppl"] - gguf_perplexity(gguf, tokens, 128, None)["ppl"]) < 1e-6 * row["ppl"]
    details = next(s for s in report["stages"] if s["name"] == "gguf")["details"]
    assert details["imatrix"] and details["imatrix"]["windows"] == 8, details


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, assets) -> dict[str, Path]:
    """Head-pruned (9 -> 6 query heads per layer: 6 x 64 = 384 != hidden 576, so head_dim is no longer
    hidden / heads) and width-pruned (MLP 1536 -> 1152, not a multiple of the K-quants' 256-column blocks)
    checkpoints of the real small model."""
    folder = tmp_path_factory.mktemp("gguf-pruned")
    model = assets / "models" / "smollm2-135m-instruct"
    return {kind: _run(folder, kind, model, [{kind: stage}], assets, save=[kind]) / "checkpoints" / kind
            for kind, stage in {"head_pruning": {"metric": "norm", "remove": 3},
                                "width_pruning": {"fraction": 0.25}}.items()}


@pytest.mark.parametrize("kind", ["head_pruning", "width_pruning"])
def test_pruned_shapes_convert_and_match_transformers(pruned, kind):
    """llama.cpp reads head_dim from attention.key_length (the converter writes config.head_dim: 64, with 6
    heads on hidden 576) and the MLP width from feed_forward_length (1152), so neither needs refusing: as f16
    both give transformers' greedy tokens."""
    ck = pruned[kind]
    config = json.loads((ck / "config.json").read_text())
    if kind == "head_pruning":
        assert config["num_attention_heads"] == 6 and config["head_dim"] == 64 and config["hidden_size"] == 576
    else:
        assert config["intermediate_size"] == 1152
    proc, out = _export(ck, "f16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = _metadata(out)
    if kind == "head_pruning":
        assert (meta["llama.attention.head_count"], meta["llama.attention.key_length"]) == (6, 64)
    else:
        assert meta["llama.feed_forward_length"] == 1152
    r = _verify(out)
    assert r.ok and r.quantization is None and r.verdict.same_tokens, r.to_json()
    # quantized: rows of 384 (heads) / 1152 (MLP) columns, which K-quants' 256-column super-blocks do not divide
    # (hidden 576 does not either): llama.cpp's quantizer falls back to Q5_0 for those tensors. The width-pruned
    # q4_k_m passes verify's q4_k_m thresholds; the head-pruned one converts, loads and tracks the float model
    # (top-1 0.63 measured) but falls below them (0.75): its float top-1/top-2 margin is half the unpruned
    # model's, so quantization noise flips more tokens (README, "Deploying the result: GGUF")
    proc, out = _export(ck, "q4_k_m")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = _verify(out)
    assert r.quantization == "q4_k_m" and r.verdict is not None, r.to_json()
    if kind == "width_pruning":
        assert r.ok, r.to_json()
    else:
        assert 0.5 < r.verdict.top1_agree < 1.0, r.to_json()  # a wrong conversion would agree on ~nothing


def test_tiny_qwen2_with_biases_and_an_untied_head_matches_transformers(tmp_path, assets):
    """Qwen2's q/k/v biases and a separate lm_head reach the GGUF. A tiny random Qwen2 with the real Qwen2.5
    tokenizer (llama.cpp's converter recognises its BPE pre-tokenizer by hash; a made-up one it refuses), as
    f16: the same greedy tokens as transformers. Biases are large, so a GGUF without them would differ."""
    import torch
    import transformers as tf
    from transformers import AutoTokenizer

    from conftest import randomize_norms

    # the converter's qwen2 path identifies the BPE pre-tokenizer by the hash of its tokens on a test string, and
    # transformers 5 loads any qwen2 folder's tokenizer as Qwen2Tokenizer (its own pre-tokenizer): only Qwen's
    # vocabulary gives a known hash (SmolLM2's tokenizer.json in a qwen2 folder is refused), so this needs the
    # qwen15 asset's tokenizer files (CI fetches the asset and sets COMPRESS_REQUIRE_QWEN15=1)
    qwen = assets / "models" / "qwen2.5-coder-1.5b-instruct"
    if not (qwen / "tokenizer.json").exists():
        why = f"asset {qwen} absent (its tokenizer is needed): run `bash ../shared/assets/fetch.sh --only qwen15`"
        if os.environ.get("COMPRESS_REQUIRE_QWEN15") == "1":
            pytest.fail(why)
        pytest.skip(why)
    tok = AutoTokenizer.from_pretrained(qwen)
    config = tf.Qwen2Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                            tie_word_embeddings=False, initializer_range=0.2, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, rope_theta=1e6)
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(config).eval()
    randomize_norms(model)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                assert proj.bias is not None
                proj.bias.normal_(0, 0.5)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    folder = tmp_path / "qwen2"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    proc, out = _export(folder, "f16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = _tensor_names(out)
    assert {"output.weight", "blk.0.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"} <= names
    r = _verify(out)
    assert r.ok and r.verdict.same_tokens and r.quantization is None, r.to_json()


def test_gguf_reader_is_llama_cpps_even_when_another_gguf_was_imported_first(tmp_path, monkeypatch):
    """pytest puts tests/ on sys.path, and tests/gguf/ is then a namespace package `gguf`: once something
    imported it, `from gguf import GGUFReader` failed (seen in the full suite). The environment's gguf-py wins."""
    import importlib

    from compress.gguf.env import gguf_env, gguf_reader

    (tmp_path / "gguf").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "gguf" or m.startswith("gguf.")]:
        monkeypatch.delitem(sys.modules, name)
    stray = importlib.import_module("gguf")
    assert getattr(stray, "__file__", None) is None  # a namespace package, no GGUFReader
    reader = gguf_reader()
    assert reader.__name__ == "GGUFReader"
    assert Path(sys.modules[reader.__module__].__file__).resolve().is_relative_to(
        (gguf_env().converter.parent / "gguf-py").resolve())
