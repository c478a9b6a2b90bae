"""Text sources: hub datasets with a config name, local files through a `datasets` builder, and
how reports name them. The hub is faked behind `datasets.load_dataset` (tests run offline); local
builder files are read by the real `datasets` library."""

from __future__ import annotations

import json

import pytest

from compress.data.sources import TextSource, load_texts, source_description, source_label
from compress.errors import CompressError


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset replaced by a recorder that streams the given rows."""
    datasets = pytest.importorskip("datasets")
    calls, rows = [], []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return iter(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, rows


def test_hub_dataset_with_a_config_name_is_streamed_with_exactly_those_arguments(fake_hub):
    calls, rows = fake_hub
    rows += [{"text": " = Valkyria Chronicles III = \n"}, {"text": ""}, {"text": " Senjō no Valkyria 3 \n"}]
    source = TextSource(dataset="wikitext", name="wikitext-2-raw-v1", split="test", text_field="text")
    assert load_texts(source) == [r["text"] for r in rows]
    assert calls == [(("wikitext",), {"name": "wikitext-2-raw-v1", "data_files": None, "split": "test",
                                      "streaming": True, "revision": None})]
    assert source_label(source) == source_description(source) == "wikitext/wikitext-2-raw-v1:test"


def test_pg19_alias_and_hub_repo_files(fake_hub):
    calls, rows = fake_hub
    rows.append({"text": "a book"})
    load_texts(TextSource(dataset="pg19", split="validation"))
    c4 = TextSource(dataset="allenai/c4", data_files="en/c4-validation.00000-of-00008.json.gz", split="validation")
    load_texts(c4)
    assert [(args, kw["name"], kw["data_files"], kw["split"]) for args, kw in calls] == [
        (("emozilla/pg19",), None, None, "validation"),
        (("allenai/c4",), None, ["en/c4-validation.00000-of-00008.json.gz"], "validation")]
    assert source_description(c4) == "allenai/c4:validation (data_files: en/c4-validation.00000-of-00008.json.gz)"


def test_hub_streaming_stops_once_enough_characters_are_read(fake_hub):
    calls, rows = fake_hub
    rows += [{"text": "x" * 10} for _ in range(100)]
    assert load_texts(TextSource(dataset="owner/big"), max_chars=25) == ["x" * 10] * 3


def test_missing_text_field_lists_the_columns_found(fake_hub):
    _, rows = fake_hub
    rows.append({"content": "words", "id": 3})
    with pytest.raises(CompressError) as e:
        load_texts(TextSource(dataset="owner/name"))
    assert str(e.value) == ("hub dataset 'owner/name' has no column 'text'; columns: ['content', 'id'] "
                            "(set text_field to one of them)")


def test_an_unreachable_hub_dataset_says_how_to_go_offline(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CompressError, match=r"could not open hub dataset 'wikitext' config 'wikitext-2-raw-v1' "
                                            r"split 'test': Couldn't reach .* with `data_files:`\) instead"):
        load_texts(TextSource(dataset="wikitext", name="wikitext-2-raw-v1"))


# -- local files through datasets' builders (the real library, offline) ------------------------

@pytest.fixture
def jsonl_files(tmp_path):
    files = []
    for name, docs in (("a.jsonl", ["first doc", "second doc"]), ("b.jsonl", ["third doc"])):
        p = tmp_path / name
        p.write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)))
        files.append(str(p))
    return files


def test_json_builder_reads_local_files_in_order(jsonl_files):
    source = TextSource(dataset="json", data_files=jsonl_files, split="test")
    assert load_texts(source) == ["first doc", "second doc", "third doc"]
    assert source_label(source) == "json:a.jsonl,b.jsonl"
    assert source_description(source) == f"json:{jsonl_files[0]},{jsonl_files[1]}"


def test_csv_builder_reads_the_text_field_and_lists_columns_when_it_is_missing(tmp_path):
    p = tmp_path / "rows.csv"
    p.write_text("body,score\n\"Emma Woodhouse, handsome\",1\nclever and rich,2\n")
    assert load_texts(TextSource(dataset="csv", data_files=[str(p)], text_field="body")) == \
        ["Emma Woodhouse, handsome", "clever and rich"]
    with pytest.raises(CompressError) as e:
        load_texts(TextSource(dataset="csv", data_files=[str(p)]))
    assert str(e.value) == f"dataset csv:{p} has no column 'text'; columns: ['body', 'score'] (set text_field to one of them)"


def test_an_empty_csv_cell_is_named_by_row(tmp_path):
    p = tmp_path / "rows.csv"
    p.write_text("body\nfine\n\"\"\n")
    with pytest.raises(CompressError, match=r"dataset csv:.*rows.csv: row 1 column 'body' holds NoneType, not text"):
        load_texts(TextSource(dataset="csv", data_files=[str(p)], text_field="body"))


def test_a_missing_builder_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(CompressError, match=rf"dataset json: could not read data_files \['{missing}'\]"):
        load_texts(TextSource(dataset="json", data_files=[str(missing)]))


@pytest.mark.parametrize("fields, message", [
    ({"dataset": "json"}, "dataset: json reads local files; give `data_files: [file, ...]`"),
    ({"dataset": "jsonl", "data_files": ["a.jsonl"]},
     "dataset: 'jsonl' is not a builder for local data_files; use one of ['csv', 'json', 'parquet', 'text']"),
    ({"path": "a.txt", "data_files": ["a.jsonl"]}, "`name` and `data_files` go with `dataset:`"),
    ({"path": "a.txt", "name": "wikitext-2-raw-v1"}, "`name` and `data_files` go with `dataset:`"),
    ({"dataset": "json", "data_files": []}, "data_files: is empty"),
    ({"dataset": "csv", "name": "default", "data_files": ["a.csv"]}, "name: is a hub dataset's config; the csv builder"),
])
def test_inconsistent_sources_say_what_to_change(fields, message):
    with pytest.raises(ValueError) as e:
        TextSource(**fields)
    assert message in str(e.value)
