"""Shared fixtures: tiny random models of several architectures, a tiny tokenizer, the real assets."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FETCH = REPO.parent / "shared" / "assets" / "fetch.sh"
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=320, max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
            pad_token_id=0)
MIXED = ["sliding_attention", "full_attention"] * 4


def _config(kind: str, layers: int):
    import transformers as tf

    if kind == "llama":
        return tf.LlamaConfig(num_hidden_layers=layers, **TINY)
    if kind == "mistral":
        return tf.MistralConfig(num_hidden_layers=layers, sliding_window=8, **TINY)
    if kind == "qwen2":
        return tf.Qwen2Config(num_hidden_layers=layers, use_sliding_window=True, sliding_window=6,
                              layer_types=MIXED[:layers], **TINY)
    if kind == "qwen3":
        return tf.Qwen3Config(num_hidden_layers=layers, head_dim=16, use_sliding_window=True,
                              sliding_window=6, layer_types=MIXED[:layers], **TINY)
    if kind == "gemma3_text":
        return tf.Gemma3TextConfig(num_hidden_layers=layers, head_dim=16, sliding_window=6,
                                   layer_types=MIXED[:layers], **TINY)
    if kind == "phi3":
        return tf.Phi3Config(num_hidden_layers=layers, **TINY)
    if kind == "gpt_neox":
        return tf.GPTNeoXConfig(num_hidden_layers=layers, hidden_size=64, intermediate_size=128,
                                num_attention_heads=4, vocab_size=320, max_position_embeddings=256,
                                bos_token_id=0, eos_token_id=0)
    raise ValueError(kind)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gpt_neox"]


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every norm weight random values (fresh models have all-ones norms, which would hide
    bugs such as taking hidden states after the final norm)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))


def tiny_model(kind: str = "llama", layers: int = 5, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(kind, layers), dtype=torch.float32).eval()
    randomize_norms(model, seed)
    return model


TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be "
        "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
        "surrounding families, that he is considered the rightful property of some one or other of "
        "their daughters. ")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with 320 entries, trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer) -> Path:
    """A saved tiny Llama (5 layers) with tokenizer, as a user's local model folder."""
    d = tmp_path / "tiny-llama"
    tiny_model("llama", 5).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def text_file(tmp_path) -> Path:
    p = tmp_path / "book.txt"
    p.write_text(TEXT * 40)
    return p


@pytest.fixture(scope="session")
def assets() -> Path:
    """The real small model, books and MMLU rows, fetched like README says if not there yet."""
    out = Path(os.environ.get("COMPRESS_ASSETS", REPO.parent / "shared-cache"))
    model = out / "models" / "smollm2-135m-instruct"
    if not (model / ".fetched").exists() or not (out / "books" / ".fetched").exists():
        if not FETCH.exists():
            pytest.skip(f"assets absent and {FETCH} not found (needs the shared/ folder beside the repo)")
        proc = subprocess.run(["bash", str(FETCH), str(out), "--only", "model,books"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"could not fetch the assets: {proc.stderr.strip().splitlines()[-1:]}")
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu skip with a reason on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any model weights load. The modules that bind ``load_model`` by name are
    imported first, so that the patch replaces their binding instead of being captured by it."""
    import compress.model_io
    import compress.pipeline
    import compress.scoring  # noqa: F401

    def refuse(*a, **k):
        raise AssertionError("a model was loaded although the input was bad")
    for where in ("compress.model_io", "compress.pipeline", "compress.scoring"):
        monkeypatch.setattr(f"{where}.load_model", refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)


def crash_perplexity_at(monkeypatch, n: int) -> None:
    """Make the n-th perplexity evaluation of a run raise (a crash between steps); undo with
    ``monkeypatch.setattr(suite, "perplexity", REAL_PERPLEXITY)``."""
    import compress.evaluate.suite as suite

    calls = {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError(f"simulated crash in perplexity evaluation {n}")
        return REAL_PERPLEXITY(*a, **k)
    monkeypatch.setattr(suite, "perplexity", crashing)


def restore_perplexity(monkeypatch) -> None:
    import compress.evaluate.suite as suite

    monkeypatch.setattr(suite, "perplexity", REAL_PERPLEXITY)


from compress.evaluate.perplexity import perplexity as REAL_PERPLEXITY  # noqa: E402
