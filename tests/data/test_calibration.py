"""A calibration set from a recipe's CalibrationConfig: plain, BOS per window, or chat-formatted."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.data.calibration import calibration_data, calibration_description
from compress.data.sources import CalibrationConfig
from compress.data.tokens import calibration_batches, tokenize_documents


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_tokenizer):
    """The tiny tokenizer, but adding a BOS (<eos>, id 0, as the tiny models' config says) to
    every encoding, the way Llama's and Gemma's tokenizers do."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tiny_tokenizer.backend_tokenizer)
    backend.post_processor = processors.TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<eos>", eos_token="<eos>", pad_token="<eos>")

def cal(text_file, **kw) -> CalibrationConfig:
    return CalibrationConfig(path=str(text_file), **{"samples": 4, "seq_len": 16, "batch_size": 3, **kw})

def test_plain_calibration_is_the_token_stream_windowed(tiny_tokenizer, text_file):
    c = cal(text_file, seed=3)
    stream = tokenize_documents(tiny_tokenizer, [text_file.read_text()])[: 4 * 16 * 4]  # 4 x what it needs
    expected = calibration_batches(stream, 4, 16, 3, 3)
    got = calibration_data(tiny_tokenizer, c)
    assert [b["input_ids"].tolist() for b in got] == [b["input_ids"].tolist() for b in expected]
    assert [b["input_ids"].shape for b in got] == [(3, 16), (1, 16)]

def test_bos_per_window_puts_one_bos_first_and_the_text_contiguously_after_it(bos_tokenizer, text_file):
    """The stream's own BOS (the tokenizer adds one) is left out: one BOS per window, at position 0."""
    got = torch.cat([b["input_ids"] for b in calibration_data(bos_tokenizer, cal(text_file, sampling="strided",
                                                                                    bos_per_window=True))])
    text = bos_tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    assert text[0] != 0 and 0 not in text  # the text itself holds no BOS
    assert got.shape == (4, 16)
    assert got[:, 0].tolist() == [0] * 4 and int(got[:, 1:].eq(0).sum()) == 0
    assert torch.cat(list(got[:, 1:])).tolist() == text[: 4 * 15]

def test_chat_template_wraps_each_window_as_a_user_turn_cut_to_seq_len(tiny_tokenizer, text_file):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}<eos>[{{ m.role }}] {{ m.content }}<eos>{% endfor %}"
    got = torch.cat([b["input_ids"] for b in calibration_data(tok, cal(text_file, seed=5, chat_template=True))])
    # Independent: the same seeded text windows, the template written out by hand, then cut.
    stream = tok(text_file.read_text(), add_special_tokens=False)["input_ids"][: 4 * 16 * 4]
    starts = torch.randint(0, len(stream) - 16, (4,), generator=torch.Generator().manual_seed(5)).tolist()
    wrapped = [tok(f"<eos>[user] {tok.decode(stream[s:s + 16])}<eos>", add_special_tokens=False)["input_ids"][:16]
               for s in starts]
    assert got.tolist() == wrapped
    assert got[:, 0].tolist() == [0] * 4  # the template's own opening token survives the cut

def test_chat_template_on_the_real_instruct_tokenizer_keeps_its_system_and_user_header(assets, text_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets / "models" / "smollm2-135m-instruct")
    header = tok(tok.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False),
                 add_special_tokens=False)["input_ids"]
    header = header[: header.index(tok.convert_tokens_to_ids("X"))]  # up to the content
    windows = torch.cat([b["input_ids"] for b in calibration_data(tok, cal(text_file, seq_len=64,
                                                                            sampling="strided", chat_template=True))])
    assert windows.shape == (4, 64)
    assert all(row[: len(header)] == header for row in windows.tolist())
    stream = tok(text_file.read_text(), add_special_tokens=False)["input_ids"]
    for i, row in enumerate(windows.tolist()):  # after the header: the window's own text, from its start
        body = tok.decode(row[len(header):])
        assert tok.decode(stream[64 * i : 64 * (i + 1)]).startswith(body)

def test_calibration_description_names_source_windows_and_wrapping(text_file):
    assert calibration_description(cal(text_file, label="Austen", chat_template=True)) == \
        f"{text_file}; 4 x 16 tokens, random, chat template"
    hub = CalibrationConfig(dataset="wikitext", name="wikitext-2-raw-v1", split="train", samples=8,
                            seq_len=32, sampling="strided", bos_per_window=True)
    assert calibration_description(hub) == "wikitext/wikitext-2-raw-v1:train; 8 x 32 tokens, strided, BOS per window"

def test_bos_per_window_and_chat_template_exclude_each_other(text_file):
    with pytest.raises(ValueError, match="give bos_per_window or chat_template, not both"):
        cal(text_file, bos_per_window=True, chat_template=True)
