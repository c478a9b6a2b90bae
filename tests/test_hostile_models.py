"""Hostile model folders: config.json and weights that disagree, malformed config keys, sequences
longer than the model's positions, calibration sets larger than memory. Each is one CompressError
naming the key or tensor and the folder, never random weights or a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import compress.model_io as model_io
from compress.cli import main
from compress.errors import CompressError
from compress.model_checks import (calibration_bytes, config_problems, layer_count_problem, listed,
                                   loading_problems)
from compress.model_io import load_model, model_facts, read_config
from compress.recipe import check_against_model, load_recipe
from conftest import ARCHS, tiny_model

CPU = torch.device("cpu")


def hostile(src: Path, dest: Path, config=None, tensors=None) -> Path:
    """A copy of the model folder ``src`` with config.json and/or model.safetensors edited."""
    shutil.copytree(src, dest)
    if config is not None:
        body = json.loads((dest / "config.json").read_text())
        config(body)
        (dest / "config.json").write_text(json.dumps(body))
    if tensors is not None:
        weights = load_file(dest / "model.safetensors")
        tensors(weights)
        save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def refuse_weights(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("weights were loaded although config.json is bad")
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)


# ---- config.json: checked before any weight loads (3e) ----------------------------------------

CONFIG_CASES = {
    "no_hidden_size": (lambda c: c.pop("hidden_size"),
                       "config.json: hidden_size is missing (transformers would silently use its default)"),
    "no_num_hidden_layers": (lambda c: c.pop("num_hidden_layers"), "config.json: num_hidden_layers is missing"),
    "layers_six": (lambda c: c.update(num_hidden_layers="six"),
                   "config.json: num_hidden_layers must be a positive integer (got 'six')"),
    "layers_zero": (lambda c: c.update(num_hidden_layers=0),
                    "config.json: num_hidden_layers must be a positive integer (got 0)"),
    "layers_bool": (lambda c: c.update(num_hidden_layers=True),
                    "config.json: num_hidden_layers must be a positive integer (got True)"),
    "heads_3": (lambda c: (c.update(num_attention_heads=3, num_key_value_heads=1), c.pop("head_dim")),
                "config.json: num_attention_heads (3) must divide hidden_size (64), unless config.json gives head_dim"),
    "heads_3_kv_2": (lambda c: c.update(num_attention_heads=3),
                     "config.json: num_key_value_heads (2) must divide num_attention_heads (3)"),
    "heads_3_head_dim": (lambda c: c.update(num_attention_heads=3, num_key_value_heads=1),
                         "config.json is not valid: The hidden size (64) is not a multiple of the number "
                         "of attention heads (3).; fix config.json"),
    "positions_text": (lambda c: c.update(max_position_embeddings="long"),
                       "config.json: max_position_embeddings must be a positive integer (got 'long')"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_keys_are_one_error_before_weights_load(case, tiny_model_dir, tmp_path, monkeypatch):
    edit, expected = CONFIG_CASES[case]
    folder = hostile(tiny_model_dir, tmp_path / case, config=edit)
    refuse_weights(monkeypatch)
    with pytest.raises(CompressError) as e:
        model_facts(read_config(str(folder)))
    assert str(e.value).startswith(f"model {str(folder)!r}: "), str(e.value)
    assert expected in str(e.value)


def test_config_problems_are_all_listed_and_aliases_count():
    raw = {"n_layer": 4, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": -1, "head_dim": None}
    assert config_problems(raw, {"num_hidden_layers": "n_layer"}) == [
        "vocab_size must be a positive integer (got -1)"]
    assert config_problems({}) == [f"{k} is missing (transformers would silently use its default)"
                                   for k in ("num_hidden_layers", "hidden_size", "num_attention_heads")]


def test_unsupported_model_types_still_get_the_supported_list(tmp_path, tiny_model_dir):
    folder = hostile(tiny_model_dir, tmp_path / "t5", config=lambda c: c.update(model_type="t5"))
    with pytest.raises(CompressError, match=r"model_type 't5' is not supported; supported: \["):
        model_facts(read_config(str(folder)))


# ---- weights that do not match config.json (3c, 3e) --------------------------------------------

def _drop(name):
    return lambda t: t.pop(name)


WEIGHT_CASES = {
    "config_100_layers": (dict(config=lambda c: c.update(num_hidden_layers=100)),
                          ["the weights do not match config.json: 855 tensor(s) the config asks for are not in "
                           "the checkpoint (model.layers.5.input_layernorm.weight, ",
                           "and 850 more) and would be filled with random values.",
                           "config.json says num_hidden_layers: 100, but the weights hold layers 0..4 only; "
                           "set num_hidden_layers: 5."]),
    "one_tensor_missing": (dict(tensors=_drop("model.layers.2.mlp.up_proj.weight")),
                           ["1 tensor(s) the config asks for are not in the checkpoint "
                            "(model.layers.2.mlp.up_proj.weight) and would be filled with random values."]),
    "wrong_shape": (dict(tensors=lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(100, 64)})),
                    ["1 tensor(s) have another shape (model.layers.1.mlp.up_proj.weight is [100, 64] in the "
                     "checkpoint, config.json implies [128, 64])"]),
    "unexpected_tensor": (dict(tensors=lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(3)})),
                          ["1 tensor(s) in the checkpoint are not part of the model config.json describes "
                           "(model.layers.9.extra.weight)"]),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
def test_weights_that_do_not_match_the_config_are_an_error(case, tiny_model_dir, tmp_path):
    edits, expected = WEIGHT_CASES[case]
    folder = hostile(tiny_model_dir, tmp_path / case, **edits)
    with pytest.raises(CompressError) as e:
        load_model(str(folder), dtype=torch.float32, device=CPU)
    message = str(e.value)
    assert message.startswith(f"model {str(folder)!r}: the weights do not match config.json: "), message
    for part in expected:
        assert part in message, message
    assert message.endswith("Fix config.json or the weights (are they from the same model?)")


@pytest.mark.parametrize("kind", ARCHS)
def test_clean_checkpoints_load_including_tied_and_buffers(kind, tmp_path, tiny_tokenizer):
    """Tied lm_head (absent from the file) and non-persistent buffers (rotary inv_freq) are not
    reported as missing; every architecture's own save loads back unchanged."""
    model = tiny_model(kind, 3)
    model.save_pretrained(tmp_path / kind)
    tiny_tokenizer.save_pretrained(tmp_path / kind)
    net, _ = load_model(str(tmp_path / kind), dtype=torch.float32, device=CPU)
    expected = model.state_dict()
    assert net.state_dict().keys() == expected.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in expected.items())


def test_tied_embeddings_are_not_missing(tmp_path, tiny_tokenizer):
    import transformers as tf

    from conftest import TINY

    config = tf.LlamaConfig(num_hidden_layers=2, tie_word_embeddings=True, **TINY)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")
    tiny_tokenizer.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied/model.safetensors")
    net, _ = load_model(str(tmp_path / "tied"), dtype=torch.float32, device=CPU)
    assert net.lm_head.weight.data_ptr() == net.model.embed_tokens.weight.data_ptr()


def test_layer_count_of_the_weights_is_checked_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    refuse_weights(monkeypatch)
    fewer = hostile(tiny_model_dir, tmp_path / "fewer", config=lambda c: c.update(num_hidden_layers=3))
    with pytest.raises(CompressError) as e:
        read_config(str(fewer))
    assert str(e.value) == (f"model {str(fewer)!r}: config.json says num_hidden_layers: 3, but the weights hold "
                            "layers 0..4 (5 layers); set num_hidden_layers: 5 if these weights are the model")
    assert model_facts(read_config(str(tiny_model_dir))).num_layers == 5


def test_layer_count_problem():
    names = ["model.embed_tokens.weight", *(f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1, 3))]
    assert layer_count_problem(names, 3) == (
        "config.json says num_hidden_layers: 3, but the weights hold layers [0, 1, 3]; "
        "layer indices must run 0..2 (is the checkpoint incomplete?)")
    assert layer_count_problem(names[:3], 2) is None
    assert layer_count_problem(["gpt_neox.layers.0.attention.dense.weight"], 1) is None
    assert layer_count_problem(["lm_head.weight"], 7) is None  # no layer names: nothing to compare


def test_loading_problems_and_listing():
    assert loading_problems({"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
                             "error_msgs": []}, 4) is None
    names = [f"model.layers.{i}.w" for i in (10, 2, 1, 3, 4, 5, 6)]
    assert listed(names) == "model.layers.1.w, model.layers.2.w, model.layers.3.w, model.layers.4.w, " \
                            "model.layers.5.w and 2 more"
    assert loading_problems({"missing_keys": {"model.layers.3.w"}}, 4) == (
        "1 tensor(s) the config asks for are not in the checkpoint (model.layers.3.w) and would be filled "
        "with random values. config.json says num_hidden_layers: 4, but the weights hold layers 0..2 only; "
        "set num_hidden_layers: 3.")


# ---- every command says it in one message ------------------------------------------------------

def recipe_for(model: Path, text: Path, tmp_path: Path, **extra) -> Path:
    body = {"model": str(model), "dtype": "float32", "device": "cpu", "output": str(tmp_path / "out"),
            "calibration": {"path": str(text), "samples": 2, "seq_len": 16},
            "evaluate": {"perplexity": {"path": str(text), "seq_len": 32, "max_tokens": 128}},
            "stages": [{"layer_removal": {"metric": "bi", "remove": 1}}], **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def commands(folder: Path, text: Path, tmp_path: Path) -> dict[str, list[str]]:
    recipe = str(recipe_for(folder, text, tmp_path))
    return {"run": ["run", recipe, "--no-progress"], "validate": ["validate", recipe],
            "score": ["score", str(folder), "--metric", "bi", "--data", str(text), "--samples", "2",
                      "--seq-len", "16"],
            "eval": ["eval", str(folder), "--ppl", str(text), "--seq-len", "32", "--max-tokens", "128"]}


@pytest.mark.parametrize("case, expected, which", [
    ("layers_six", "config.json: num_hidden_layers must be a positive integer (got 'six')",
     ["run", "validate", "score", "eval"]),
    ("no_hidden_size", "config.json: hidden_size is missing", ["run", "validate", "score", "eval"]),
    ("heads_3", "num_attention_heads (3) must divide hidden_size (64)", ["run", "validate", "score", "eval"]),
    ("wrong_shape", "model.layers.1.mlp.up_proj.weight is [100, 64] in the checkpoint",
     ["run", "score", "eval"]),  # validate reads no weights
    ("config_100_layers", "config.json says num_hidden_layers: 100, but the weights hold layers 0..4 (5 layers); "
     "set num_hidden_layers: 5 if these weights are the model", ["run", "validate", "score", "eval"]),
])
def test_each_command_reports_a_hostile_model_in_one_message(case, expected, which, tiny_model_dir,
                                                             text_file, tmp_path):
    edits = WEIGHT_CASES[case][0] if case in WEIGHT_CASES else {"config": CONFIG_CASES[case][0]}
    folder = hostile(tiny_model_dir, tmp_path / case, **edits)
    for name, args in commands(folder, text_file, tmp_path).items():
        if name not in which:
            continue
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, (name, result.output)
        assert expected in result.output and str(folder) in result.output, (name, result.output)
        assert "Traceback" not in result.output, (name, result.output)


# ---- sequences longer than the model's positions (3g a) -----------------------------------------

def test_max_positions_is_a_model_fact(tiny_model_dir):
    assert model_facts(read_config(str(tiny_model_dir))).max_position_embeddings == 256


@pytest.mark.parametrize("edit, key", [
    (lambda r: r["calibration"].update(seq_len=300), "calibration.seq_len: 300 tokens"),
    (lambda r: r["evaluate"]["perplexity"].update(seq_len=257), "evaluate.perplexity.seq_len: 257 tokens"),
    (lambda r: r.update(stages=[{"layer_merge": {"calibration": {"path": r["calibration"]["path"],
                                                                 "samples": 2, "seq_len": 512}, "remove": 1}}]),
     "stages[0].layer_merge.calibration.seq_len: 512 tokens"),
    (lambda r: r["evaluate"].update(efficiency={"prompt_tokens": 250, "new_tokens": 10}),
     "evaluate.efficiency.prompt_tokens + new_tokens: 260 tokens"),
])
def test_sequences_longer_than_the_model_positions_are_refused(edit, key, tiny_model_dir, text_file, tmp_path,
                                                               monkeypatch):
    path = recipe_for(tiny_model_dir, text_file, tmp_path)
    body = yaml.safe_load(path.read_text())
    edit(body)
    path.write_text(yaml.safe_dump(body))
    refuse_weights(monkeypatch)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1, result.output
    assert (f"{key} is longer than the model's max_position_embeddings (256); use 256 or less "
            "(positions past it were never trained, quality collapses)") in result.output


def test_score_and_eval_refuse_seq_len_past_the_model_positions(tiny_model_dir, text_file, monkeypatch):
    refuse_weights(monkeypatch)
    for args in (["score", str(tiny_model_dir), "--metric", "bi", "--data", str(text_file), "--seq-len", "300"],
                 ["eval", str(tiny_model_dir), "--ppl", str(text_file), "--seq-len", "300"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert "--seq-len: 300 tokens is longer than the model's max_position_embeddings (256)" in result.output


# ---- pickle weights: the hint names what the caller can set (3g b) --------------------------------

@pytest.fixture
def pickle_only(tiny_model_dir, tmp_path) -> Path:
    folder = hostile(tiny_model_dir, tmp_path / "pickle")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_weights_need_the_flag_on_the_command_line(pickle_only, text_file):
    for args in (["score", str(pickle_only), "--metric", "sequential"],
                 ["eval", str(pickle_only)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert "torch.load(weights_only=True), pass --allow-pickle-weights." in result.output
        assert "recipe" not in result.output
    ok = CliRunner().invoke(main, ["score", str(pickle_only), "--metric", "sequential", "--allow-pickle-weights"])
    assert ok.exit_code == 0, ok.output
    ok = CliRunner().invoke(main, ["eval", str(pickle_only), "--allow-pickle-weights", "--ppl", str(text_file),
                                   "--seq-len", "32", "--max-tokens", "128"])
    assert ok.exit_code == 0, ok.output


def test_pickle_weights_in_a_recipe_name_the_recipe_key(pickle_only, text_file, tmp_path):
    result = CliRunner().invoke(main, ["run", str(recipe_for(pickle_only, text_file, tmp_path))])
    assert result.exit_code == 1
    assert "set `allow_pickle_weights: true` in the recipe." in result.output


# ---- calibration sets larger than memory (3g c) --------------------------------------------------

def test_calibration_bytes_equals_the_tensors_it_stands_for():
    samples, seq_len, hidden = 3, 16, 64
    ids = torch.zeros(samples, seq_len, dtype=torch.long)
    hidden_states = torch.zeros(samples, seq_len, hidden, dtype=torch.float32)
    expected = ids.numel() * ids.element_size() + hidden_states.numel() * hidden_states.element_size()
    assert calibration_bytes(samples, seq_len, hidden) == expected
    assert calibration_bytes(samples, seq_len, None) == ids.numel() * ids.element_size()


def test_calibration_larger_than_memory_is_refused_before_loading(tiny_model_dir, text_file, tmp_path,
                                                                  monkeypatch):
    path = recipe_for(tiny_model_dir, text_file, tmp_path)
    body = yaml.safe_load(path.read_text())
    body["calibration"]["samples"] = 1_000_000  # under the schema's bound (2**20), over 1 GiB
    path.write_text(yaml.safe_dump(body))
    monkeypatch.setattr(model_io, "available_bytes", lambda device: 2**30)
    refuse_weights(monkeypatch)
    need = calibration_bytes(1_000_000, 16, 64) / 2**30
    for args in (["validate", str(path)], ["run", str(path)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert (f"calibration.samples: 1000000 samples x 16 tokens need about {need:.1f} GiB (token ids + a "
                "float32 hidden state of 64 values per token), but 1.0 GiB of memory is available; "
                "lower samples or seq_len") in result.output


def test_a_billion_calibration_samples_are_a_recipe_error(tiny_model_dir, text_file, tmp_path, monkeypatch):
    path = recipe_for(tiny_model_dir, text_file, tmp_path)
    body = yaml.safe_load(path.read_text())
    body["calibration"]["samples"] = 1_000_000_000
    path.write_text(yaml.safe_dump(body))
    refuse_weights(monkeypatch)
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 1
    assert "calibration.samples: Input should be less than or equal to 1048576 (got 1000000000)" in result.output


def test_stage_calibration_and_score_are_checked_against_memory(tiny_model_dir, text_file, tmp_path,
                                                                monkeypatch):
    monkeypatch.setattr(model_io, "available_bytes", lambda device: 1000)  # 1000 bytes free
    path = recipe_for(tiny_model_dir, text_file, tmp_path,
                      stages=[{"layer_merge": {"calibration": {"path": str(text_file), "samples": 2,
                                                               "seq_len": 8}, "remove": 1}}])
    body = yaml.safe_load(path.read_text())
    body.pop("calibration")
    path.write_text(yaml.safe_dump(body))
    recipe = load_recipe(path)
    with pytest.raises(CompressError, match=r"stages\[0\]\.layer_merge\.calibration\.samples: 2 samples x 8 "
                                            r"tokens need about 0\.0 GiB"):
        check_against_model(recipe, model_facts(read_config(str(tiny_model_dir))))
    result = CliRunner().invoke(main, ["score", str(tiny_model_dir), "--metric", "bi", "--data", str(text_file),
                                       "--samples", "2", "--seq-len", "8"])
    assert result.exit_code == 1
    assert "--samples x --seq-len: 2 samples x 8 tokens need about 0.0 GiB" in result.output
