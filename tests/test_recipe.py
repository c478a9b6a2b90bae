"""Recipes are validated completely before any model loads; every error names file, key, fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compress.cli import main
from compress.errors import CompressError
from compress.recipe import check_against_model, load_recipe
from compress.stages.base import ModelFacts

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, body: str | dict, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return p


@pytest.fixture
def good(tmp_path, tiny_model_dir, text_file) -> dict:
    return {
        "model": str(tiny_model_dir), "dtype": "float32", "output": "out",
        "calibration": {"path": str(text_file), "samples": 4, "seq_len": 16},
        "evaluate": {"perplexity": {"path": str(text_file), "seq_len": 32, "max_tokens": 256}},
        "stages": [{"layer_removal": {"metric": "bi", "remove": 2}}],
    }


def error_of(tmp_path, recipe) -> str:
    with pytest.raises(CompressError) as e:
        load_recipe(write(tmp_path, recipe))
    return str(e.value)


def test_good_recipe_loads_with_defaults_and_resolved_paths(tmp_path, good):
    r = load_recipe(write(tmp_path, good))
    assert r.output == tmp_path / "out"
    assert r.model_is_local and r.dtype == "float32" and r.device == "auto"
    assert [s.name for s in r.stages] == ["layer_removal"] and r.save == ["layer_removal"]
    assert r.stages[0].config.remove == 2
    assert r.evaluate.after == ["baseline", "every_stage"]
    assert r.trust_remote_code is False


def test_relative_paths_and_env_vars_resolve_against_the_recipe_file(tmp_path, good, monkeypatch, text_file):
    (tmp_path / "sub").mkdir()
    monkeypatch.setenv("BOOKS", str(text_file.parent))
    good["calibration"]["path"] = "${BOOKS}/book.txt"
    good["evaluate"]["perplexity"]["path"] = "../book.txt"
    good["output"] = "${NOT_SET_ANYWHERE:-runs}/x"
    r = load_recipe(write(tmp_path / "sub", good))
    assert r.calibration.path == str(text_file)
    assert r.evaluate.perplexity.path == str(text_file)
    assert r.output == tmp_path / "sub" / "runs" / "x"


@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r.update(colour="red"), "colour: unknown key"),
    (lambda r: r["calibration"].update(samplez=3), "calibration.samplez: unknown key"),
    (lambda r: r["stages"][0]["layer_removal"].update(how="fast"), "stages[0].layer_removal.how: unknown key"),
    (lambda r: r.update(dtype="float64"), "dtype: Input should be 'auto', 'float32', 'float16' or 'bfloat16'"),
    (lambda r: r["calibration"].update(samples="many"), "calibration.samples: Input should be a valid integer (got 'many')"),
    (lambda r: r["calibration"].update(samples=0), "calibration.samples: Input should be greater than or equal to 1"),
    (lambda r: r["stages"][0]["layer_removal"].update(remove=-3), "stages[0].layer_removal.remove: Input should be greater than or equal to 1 (got -3)"),
    (lambda r: r["stages"][0]["layer_removal"].update(fraction=0.2), "stages[0].layer_removal: give exactly one of remove, fraction, layers (got ['remove', 'fraction'])"),
    (lambda r: r["stages"][0]["layer_removal"].update(metric="magic"), "stages[0].layer_removal.metric: Input should be 'angular', 'angular_block', 'angular_layer', 'bi', 'ppl_drop', 'relative_magnitude', 'reverse' or 'sequential'"),
    (lambda r: r["calibration"].update(sampling="shuffled"), "calibration.sampling: Input should be 'random' or 'strided' (got 'shuffled')"),
    (lambda r: r["stages"].append({"prune_heads": {}}), "stages[1]: unknown stage 'prune_heads'; supported: ['bnb4', 'gguf', 'gptq', 'head_pruning', 'heal', 'layer_merge', 'layer_removal', 'width_pruning']"),
    (lambda r: r["stages"].append({"gptq": {"bits": 5}}), "stages[1].gptq.bits: Input should be 2, 3, 4 or 8 (got 5)"),
    (lambda r: r["stages"].extend([{"gptq": {}}, {"bnb4": {}}]), "stages[2].bnb4: comes after quantization stage 'gptq'"),
    (lambda r: r["stages"].append("layer_removal"), "stages[1]: each stage is a mapping with one key"),
    (lambda r: r.update(stages=[]), "stages: List should have at least 1 item"),
    (lambda r: r.pop("output"), "output: required key is missing"),
    (lambda r: r.update(save=["gptq"]), "save[0]: 'gptq' is not a stage of this recipe; stages: ['layer_removal']"),
    (lambda r: r["evaluate"].update(after=["baseline", "later"]), "evaluate.after[1]: 'later' is not one of"),
    (lambda r: r["calibration"].update(path="missing.txt"), "missing.txt does not exist"),
    (lambda r: r["calibration"].update(dataset="pg19"), "calibration: give exactly one of `dataset`"),
    (lambda r: r.update(model="./no-such-model"), "model: local model folder"),
    (lambda r: r.update(model="not a hub id!"), "model: 'not a hub id!' is neither an existing local folder nor a hub id"),
    (lambda r: r.update(device="tpu"), "device: 'tpu' is not one of auto, cpu, cuda, cuda:N, mps"),
    (lambda r: r.update(calibration=None), "stages[0].layer_removal: needs calibration data"),
    (lambda r: r["evaluate"]["perplexity"].update(stride=64), "evaluate.perplexity: stride (64) must not exceed seq_len (32)"),
    (lambda r: r.update(output="${UNSET_VAR_FOR_TEST}"), "output: environment variable ${UNSET_VAR_FOR_TEST} is not set"),
    (lambda r: r["stages"][0].update(layer_removal={"layers": [1], "metric": "bi"}), "`metric` has no effect with an explicit `layers` list"),
])
def test_bad_recipes_name_the_key_and_what_is_allowed(tmp_path, good, mutate, expected):
    mutate(good)
    message = error_of(tmp_path, good)
    assert message.startswith(f"{tmp_path / 'r.yaml'}: invalid recipe")
    assert expected in message


@pytest.mark.parametrize("tasks, expected", [
    ({"names": ["arc_easy"], "shots": 5}, "evaluate.tasks.shots: unknown key"),
    ({"names": ["arc_easy"], "limit": 0}, "evaluate.tasks.limit: Input should be greater than or equal to 1 (got 0)"),
    ({"names": ["arc_easy"], "num_fewshot": -1},
     "evaluate.tasks.num_fewshot: Input should be greater than or equal to 0 (got -1)"),
    ({"names": ["arc_easy"], "batch_size": 0}, "evaluate.tasks.batch_size: Input should be greater than or equal to 1"),
    ({"names": []}, "evaluate.tasks.names: List should have at least 1 item"),
    ({}, "evaluate.tasks.names: required key is missing"),
    ({"names": "arc_easy"}, "evaluate.tasks.names: Input should be a valid list (got 'arc_easy')"),
    ({"names": ["arc_easy", "arc_easy"]}, "evaluate.tasks.names: a task is named twice: ['arc_easy']"),
    ({"names": ["arc_easy,hellaswag"]}, "evaluate.tasks.names: task names are non-empty and have no commas"),
    ({"names": ["mine"], "include_path": "no-such-folder"},
     "evaluate.tasks.include_path: {tmp}/no-such-folder is not a folder"),
])
def test_bad_evaluate_tasks_name_the_key(tmp_path, good, tasks, expected):
    good["evaluate"]["tasks"] = tasks
    assert expected.format(tmp=tmp_path) in error_of(tmp_path, good)


def test_evaluate_tasks_resolve_include_path_and_refuse_layerwise(tmp_path, good):
    (tmp_path / "my-tasks").mkdir()
    good["evaluate"]["tasks"] = {"names": ["mine", "arc_easy"], "include_path": "my-tasks", "limit": 3}
    tasks = load_recipe(write(tmp_path, good)).evaluate.tasks
    assert tasks.include_path == str(tmp_path / "my-tasks") and tasks.names == ["mine", "arc_easy"]
    assert (tasks.num_fewshot, tasks.limit, tasks.batch_size) == (None, 3, 8)
    good["layerwise"] = True
    assert ("evaluate.tasks: lm-eval runs the whole model on one device, but a layer-wise run keeps the "
            "weights in CPU memory") in error_of(tmp_path, good)


def test_every_problem_is_listed_at_once(tmp_path, good):
    good["colour"] = "red"
    good["calibration"]["samples"] = -1
    good["stages"][0]["layer_removal"]["remove"] = 0
    message = error_of(tmp_path, good)
    assert "(3 problem(s))" in message
    assert "colour" in message and "calibration.samples" in message and "remove" in message


@pytest.mark.parametrize("body, expected", [
    ("", "the recipe is empty"),
    ("model: [unclosed\n", "not valid YAML at line 2"),
    ("- just\n- a list\n", "a recipe is a YAML mapping"),
])
def test_unparseable_files(tmp_path, body, expected):
    assert expected in error_of(tmp_path, body)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CompressError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(CompressError, match="is a directory; give the recipe's .yaml file"):
        load_recipe(tmp_path)


def facts(layers: int) -> ModelFacts:
    return ModelFacts(model_type="llama", num_layers=layers)


@pytest.mark.parametrize("stage, expected", [
    ({"remove": 5}, "stages[0].layer_removal.remove: would remove 5 of 5 layers; at least one must remain (max 4)"),
    ({"fraction": 0.95}, "stages[0].layer_removal.fraction: would remove 5 of 5 layers"),
    ({"fraction": 0.05}, "fraction: 0.05 of 5 layers rounds to 0 layers"),
    ({"layers": [1, 7]}, "stages[0].layer_removal.layers: [7] out of range; the model has 5 layers here (0..4)"),
    ({"layers": [1, 1]}, "layers: repeated indices in [1, 1]"),
])
def test_checks_against_the_model_config(tmp_path, good, stage, expected):
    good["stages"] = [{"layer_removal": stage}]
    recipe = load_recipe(write(tmp_path, good))
    with pytest.raises(CompressError) as e:
        check_against_model(recipe, facts(5))
    assert expected in str(e.value)


def test_chained_removals_count_remaining_layers(tmp_path, good):
    good["stages"] = [{"layer_removal": {"remove": 2}}, {"layer_removal": {"remove": 2, "metric": "angular"}}]
    recipe = load_recipe(write(tmp_path, good))
    assert [s.name for s in recipe.stages] == ["layer_removal", "layer_removal_2"]
    with pytest.raises(CompressError, match=r"stages\[1\].layer_removal.remove: would remove 2 of 2"):
        check_against_model(recipe, facts(4))
    check_against_model(recipe, facts(5))


def test_cli_reports_user_errors_without_traceback(tmp_path, good):
    good["stages"][0]["layer_removal"]["remove"] = -1
    path = write(tmp_path, good)
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 1
    assert "Error: " in result.output and "stages[0].layer_removal.remove" in result.output
    assert "Traceback" not in result.output


def test_cli_validate_checks_against_the_model_without_loading_weights(tmp_path, good):
    good["stages"][0]["layer_removal"]["remove"] = 9
    result = CliRunner().invoke(main, ["validate", str(write(tmp_path, good))])
    assert result.exit_code == 1 and "would remove 9 of 5 layers" in result.output
    good["stages"][0]["layer_removal"]["remove"] = 2
    result = CliRunner().invoke(main, ["validate", str(write(tmp_path, good))])
    assert result.exit_code == 0, result.output
    assert "ok (1 stage(s): layer_removal; model llama with 5 layers" in result.output


# The hub models' shapes (their config.json), so gated hub recipes are checked offline too.
HUB_FACTS = {
    "meta-llama/Llama-2-7b-hf": ModelFacts("llama", 32, 32, 32, 11008, hidden_size=4096),
    "meta-llama/Llama-2-13b-hf": ModelFacts("llama", 40, 40, 40, 13824, hidden_size=5120),
}
SHIPPED = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))


def test_every_recipe_file_is_checked():
    assert {"quickstart.yaml", "quickstart-gptq.yaml", "quickstart-merge.yaml", "quickstart-heads.yaml",
            "quickstart-width.yaml", "llama2-7b-gptq-27pct.yaml", "llama2-7b-bnb4-27pct.yaml",
            "quickstart-heal.yaml", "llama2-7b-bi27-heal-gptq.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_validate(name, monkeypatch, assets):
    """Every recipes/*.yaml loads and passes the checks against its model's config."""
    from compress.model_io import model_facts, read_config

    monkeypatch.setenv("COMPRESS_ASSETS", str(assets))
    recipe = load_recipe(REPO / "recipes" / name)
    assert recipe.stages and recipe.save
    assert recipe.output.parent == REPO / "runs"
    if recipe.model_is_local:
        facts = model_facts(read_config(recipe.model, recipe.revision, recipe.trust_remote_code))
    else:
        facts = HUB_FACTS[recipe.model]
    check_against_model(recipe, facts)


# SmolLM2-135M's config.json shapes: hidden 576, MLP 1536, 9 heads in 3 KV groups, head_dim 64.
SMOLLM2 = ModelFacts("llama", 30, 9, 3, 1536, hidden_size=576)


def refusal(tmp_path, good, stages, facts=SMOLLM2) -> str:
    """check_against_model's message for ``stages``, or "" when they fit."""
    good["stages"] = stages
    try:
        check_against_model(load_recipe(write(tmp_path, good)), facts)
    except CompressError as e:
        return str(e)
    return ""


def test_gptq_group_size_is_checked_against_the_width_pruning_leaves(tmp_path, good):
    """width_pruning remove: 32 then gptq group 64 used to validate and write down_proj 1504 wide."""
    msg = refusal(tmp_path, good, [{"width_pruning": {"remove": 32, "multiple_of": 32}},
                                   {"gptq": {"group_size": 64}}])
    assert ("  - stages[1].gptq.group_size: 64 does not divide down_proj in_features 1504 (intermediate_size "
            "after stages[0].width_pruning); the int4 kernels need whole groups: use group_size: 32 or -1, "
            "or set multiple_of: 64 on stages[0].width_pruning") in msg.splitlines()
    assert len([line for line in msg.splitlines() if line.startswith("  - ")]) == 1  # the width stage is fine
    # the same recipe with the default multiple_of (128) is refused at the width stage instead
    msg = refusal(tmp_path, good, [{"width_pruning": {"remove": 32}}, {"gptq": {"group_size": 64}}])
    assert "stages[0].width_pruning.remove: removing 32 of 1536 MLP channels leaves 1504, which multiple_of: 128 " \
           "rounds up to 1536 (nothing removed)" in msg and "stages[1]" not in msg


@pytest.mark.parametrize("stages", [
    [{"width_pruning": {"remove": 32, "multiple_of": 32}}, {"gptq": {"group_size": 32}}],
    [{"width_pruning": {"remove": 32, "multiple_of": 32}}, {"gptq": {"group_size": -1}}],
    [{"width_pruning": {"remove": 64, "multiple_of": 64}}, {"gptq": {"group_size": 64}}],
    [{"width_pruning": {"fraction": 0.25}}, {"gptq": {"group_size": 64}}],  # 1152
    [{"width_pruning": {"remove": 200}}, {"gptq": {"group_size": 64}}],      # 1336 rounds up to 1408
    [{"head_pruning": {"remove": 6, "multiple_of": 64}}, {"gptq": {"group_size": 64}}],  # o_proj 192
    [{"layer_removal": {"remove": 7}}, {"width_pruning": {"fraction": 0.25}}, {"head_pruning": {"remove": 3}},
     {"gptq": {"group_size": 64}}],
])
def test_valid_pruned_shapes_pass_the_quantizer_check(tmp_path, good, stages):
    assert refusal(tmp_path, good, stages) == ""


def test_head_pruning_width_reaches_the_gptq_check(tmp_path, good):
    facts = ModelFacts("llama", 4, 6, 3, 1024, hidden_size=384, head_dim=64)
    msg = refusal(tmp_path, good, [{"head_pruning": {"remove": 3, "multiple_of": 64}},
                                   {"gptq": {"group_size": 128}}], facts)
    assert ("stages[1].gptq.group_size: 128 does not divide o_proj in_features 192 (3 heads x head_dim 64 after "
            "stages[0].head_pruning); the int4 kernels need whole groups: use group_size: 64 or -1, or set "
            "multiple_of: 128 on stages[0].head_pruning") in msg
    assert refusal(tmp_path, good, [{"head_pruning": {"remove": 3, "multiple_of": 64}},
                                    {"gptq": {"group_size": 64}}], facts) == ""


def test_every_stage_sees_the_shapes_the_earlier_ones_leave(tmp_path, good):
    msg = refusal(tmp_path, good, [{"layer_removal": {"remove": 20}}, {"width_pruning": {"remove": 1408}},
                                   {"width_pruning": {"remove": 128}}, {"layer_removal": {"remove": 10}}])
    # 1536 - 1408 = 128 left, so the second width stage would empty the MLP; 30 - 20 = 10 layers left
    assert "stages[2].width_pruning.remove: would leave 0 of 128 MLP channels" in msg
    assert "stages[3].layer_removal.remove: would remove 10 of 10 layers" in msg
    assert "stages[0]" not in msg and "stages[1]" not in msg


def test_a_refused_stage_hands_on_unchanged_shapes(tmp_path, good):
    msg = refusal(tmp_path, good, [{"width_pruning": {"remove": 1536}}, {"width_pruning": {"remove": 384}}])
    assert "stages[0].width_pruning.remove: would leave 0 of 1536" in msg and "stages[1]" not in msg


def test_llama2_7b_width_pruning_keeps_a_gptq_128_width(tmp_path, good):
    from compress.stages.width_pruning import WidthPruning, WidthPruningConfig

    facts = HUB_FACTS["meta-llama/Llama-2-7b-hf"]
    assert WidthPruning(WidthPruningConfig(fraction=0.25)).facts_after(facts).intermediate_size == 8320
    assert refusal(tmp_path, good, [{"width_pruning": {"fraction": 0.25}}, {"gptq": {"group_size": 128}}],
                   facts) == ""
    msg = refusal(tmp_path, good, [{"width_pruning": {"fraction": 0.25, "multiple_of": 64}},
                                   {"gptq": {"group_size": 128}}], facts)
    assert "stages[1].gptq.group_size: 128 does not divide down_proj in_features 8256" in msg


# -- data sources: hub config names, local builder files, BOS per window, chat template ----------

def test_data_files_resolve_against_the_recipe_folder(tmp_path, good):
    (tmp_path / "data").mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / "data" / name).write_text('{"text": "words"}\n')
    good["calibration"] = {"dataset": "json", "data_files": ["data/a.jsonl", "data/*.jsonl"], "samples": 4,
                           "seq_len": 16, "chat_template": True}
    good["evaluate"]["perplexity"] = {"dataset": "wikitext", "name": "wikitext-2-raw-v1", "split": "test",
                                      "bos_per_window": True, "seq_len": 32}
    r = load_recipe(write(tmp_path, good))
    assert r.calibration.data_files == [str(tmp_path / "data" / "a.jsonl"), str(tmp_path / "data" / "*.jsonl")]
    assert (r.calibration.chat_template, r.evaluate.perplexity.bos_per_window) == (True, True)
    assert r.evaluate.perplexity.name == "wikitext-2-raw-v1"


def test_data_descriptions_name_the_source_not_the_label(tmp_path, good, text_file):
    from compress.pipeline import data_descriptions

    good["calibration"].update(label="a nice book", bos_per_window=True)
    good["evaluate"]["perplexity"] = {"dataset": "wikitext", "name": "wikitext-2-raw-v1", "seq_len": 32,
                                      "max_tokens": 256, "bos_per_window": True}
    good["stages"].append({"gptq": {"calibration": {"dataset": "allenai/c4", "split": "validation",
                                                    "data_files": "en/c4-validation.00000-of-00008.json.gz",
                                                    "samples": 2, "seq_len": 16}}})
    assert data_descriptions(load_recipe(write(tmp_path, good))) == {
        "calibration": f"{text_file}; 4 x 16 tokens, random, BOS per window",
        "stages[1].gptq.calibration": "allenai/c4:validation (data_files: en/c4-validation.00000-of-00008.json.gz); "
                                      "2 x 16 tokens, random",
        "evaluate.perplexity": "wikitext/wikitext-2-raw-v1:test; first 256 tokens, seq_len 32, stride 31, BOS per window",
    }


@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r.update(calibration={"dataset": "json", "data_files": ["gone.jsonl"], "samples": 4}),
     "calibration.data_files[0]: {tmp}/gone.jsonl does not exist"),
    (lambda r: r.update(calibration={"dataset": "json", "data_files": ["none-*.jsonl"], "samples": 4}),
     "calibration.data_files[0]: {tmp}/none-*.jsonl matches no file"),
    (lambda r: r["evaluate"].update(perplexity={"dataset": "parquet", "data_files": ["."]}),
     "evaluate.perplexity.data_files[0]: {tmp} is not a file"),
    (lambda r: r.update(calibration={"dataset": "jsonl", "data_files": ["a.jsonl"]}),
     "calibration: dataset: 'jsonl' is not a builder for local data_files; use one of ['csv', 'json', 'parquet', 'text']"),
    (lambda r: r.update(calibration={"dataset": "text"}),
     "calibration: dataset: text reads local files; give `data_files: [file, ...]`"),
    (lambda r: r["calibration"].update(bos_per_window=True, chat_template=True),
     "calibration: give bos_per_window or chat_template, not both"),
    (lambda r: r["evaluate"]["perplexity"].update(bos_per_window=True, stride=32),
     "evaluate.perplexity: stride (32) must not exceed seq_len - 1 (31) with bos_per_window"),
    (lambda r: r["evaluate"]["perplexity"].update(chat_template=True), "evaluate.perplexity.chat_template: unknown key"),
])
def test_data_source_errors_name_the_key_and_the_fix(tmp_path, good, mutate, expected):
    mutate(good)
    assert expected.format(tmp=tmp_path) in error_of(tmp_path, good)


def test_mmlu_is_no_data_files_source(tmp_path, good):
    """Only text sources take data_files: an MMLU `dataset: json` stays a hub id (no crash here)."""
    good["evaluate"]["mmlu"] = {"dataset": "json", "shots": 0}
    assert load_recipe(write(tmp_path, good)).evaluate.mmlu.dataset == "json"


@pytest.mark.parametrize("name,kinds", [("quickstart-heal.yaml", ["layer_removal", "heal"]),
                                        ("llama2-7b-bi27-heal-gptq.yaml", ["layer_removal", "heal", "gptq"])])
def test_heal_recipes_heal_after_pruning_on_other_text(name, kinds, monkeypatch, assets):
    """The heal recipes prune, then heal (then quantize), and heal on text other than the evaluation's."""
    monkeypatch.setenv("COMPRESS_ASSETS", str(assets))
    recipe = load_recipe(REPO / "recipes" / name)
    assert [s.kind for s in recipe.stages] == kinds
    heal = recipe.stage("heal").config
    assert heal.method == "lora" and heal.top_k == 64 and heal.calibration.sampling == "strided"
    assert heal.calibration.samples > heal.validation_samples > 0
    ppl = recipe.evaluate.perplexity
    if ppl.path is not None:
        assert ppl.path not in heal.calibration.data_files and all(Path(f).is_file() for f in heal.calibration.data_files)
    else:
        assert (heal.calibration.dataset, heal.calibration.split) == ("pg19", "validation") != (ppl.dataset, ppl.split)
