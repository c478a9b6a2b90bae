"""Runs inside the *engine's* Python (vLLM's own virtual environment, or any Python with transformers):
loads each checkpoint of a request, generates greedily from the given prompt token ids and writes, per
prompt, the chosen tokens and their log-probabilities.

This file imports nothing from compress (compress is not installed in the engine's environment): it is
executed as a script, ``python engine_worker.py REQUEST.json RESULT.json``. The request::

    {"engine": "vllm" | "transformers" | "llamacpp", "tokens": 16, "dtype": "float32",
     "checkpoints": [{"path": "/abs/folder", "dtype": "bfloat16", "prompts": [[1, 2, 3], ...]}, ...]}

(a checkpoint's ``dtype`` and ``prompts`` default to the request's own; ``stop_token_ids``: generation
ends after the first of them, which is kept as the last token.)

The result, rewritten after every checkpoint (so a crash keeps the checkpoints already done)::

    {"engine": ..., "engine_version": ..., "results": [{"path": ..., "ok": true, "load_s": ..., "generate_s": ...,
      "outputs": [{"tokens": [...], "logprobs": [...]}, ...]} | {"path": ..., "ok": false, "error": "..."}]}

vLLM's ``LLM`` starts worker processes, hence the ``__main__`` guard. Log-probabilities are vLLM's
default ``raw_logprobs`` (log-softmax of the model's logits, before any sampling processing), the same
quantity transformers' logits give.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback


MARK = "=== compress verify: checkpoint "  # engines.py cuts the engine's log into per-checkpoint parts


def _mark(path: str) -> None:
    print(f"{MARK}{path}", flush=True)


def _write(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def _error_text(exc: BaseException) -> str:
    """The exception and, for an engine error raised from deep inside, the innermost cause."""
    lines = [f"{type(exc).__name__}: {exc}"]
    cause = exc.__cause__ or exc.__context__
    seen = 0
    while cause is not None and seen < 3:
        lines.append(f"caused by {type(cause).__name__}: {cause}")
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return "\n".join(lines)[:4000]


def _until_stop(tokens: list, logprobs: list, stops: list) -> tuple[list, list]:
    """Cut after the first stop token (kept), as both engines' outputs are compared that way."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i + 1], logprobs[:i + 1]
    return tokens, logprobs


def run_vllm(request: dict, out: dict, result_path: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU build
    os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")  # weight-only 4-bit, as the checkpoint says (engines.py)
    import vllm
    from vllm import LLM, SamplingParams

    out["engine_version"] = vllm.__version__
    for ck in request["checkpoints"]:
        entry: dict = {"path": ck["path"]}
        params = SamplingParams(temperature=0.0, max_tokens=request["tokens"], logprobs=1, ignore_eos=True,
                                stop_token_ids=ck.get("stop_token_ids") or None, detokenize=False)
        _mark(ck["path"])
        ids_list = ck.get("prompts", request.get("prompts"))
        prompts = [{"prompt_token_ids": ids} for ids in ids_list]
        longest = max(len(ids) for ids in ids_list) + request["tokens"]
        llm = None
        try:
            t0 = time.perf_counter()
            llm = LLM(model=ck["path"], dtype=ck.get("dtype", request["dtype"]), max_model_len=max(longest, 64),
                      enforce_eager=True, seed=0, max_num_seqs=len(prompts),
                      skip_tokenizer_init=True)
            entry["load_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            gens = llm.generate(prompts, params, use_tqdm=False)
            entry["generate_s"] = time.perf_counter() - t0
            outputs = []
            for g in gens:
                c = g.outputs[0]
                lps = [float(step[tok].logprob) for tok, step in zip(c.token_ids, c.logprobs)]
                tokens, lps = _until_stop(list(c.token_ids), lps, ck.get("stop_token_ids") or [])
                outputs.append({"tokens": tokens, "logprobs": lps})
            entry.update(ok=True, outputs=outputs)
        except Exception as exc:  # the engine refused the checkpoint: report why, go on with the next
            entry.update(ok=False, error=_error_text(exc), traceback=traceback.format_exc()[-4000:])
        finally:
            del llm
            gc.collect()
        out["results"].append(entry)
        _write(result_path, out)


def run_transformers(request: dict, out: dict, result_path: str) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    out["engine_version"] = transformers.__version__
    for ck in request["checkpoints"]:
        entry: dict = {"path": ck["path"]}
        _mark(ck["path"])
        name = ck.get("dtype", request["dtype"])
        dtype = getattr(torch, name) if name != "auto" else "auto"
        try:
            t0 = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(ck["path"], dtype=dtype).eval()
            entry["load_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            outputs = []
            for ids in ck.get("prompts", request.get("prompts")):
                x = torch.tensor([ids])
                with torch.no_grad():
                    stops = ck.get("stop_token_ids") or []
                    g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=request["tokens"],
                                       do_sample=False, output_logits=True, return_dict_in_generate=True,
                                       eos_token_id=stops or None, pad_token_id=(stops or [0])[0])
                new = g.sequences[0, len(ids):].tolist()
                lps = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(g.logits, new)]
                new, lps = _until_stop(new, lps, stops)
                outputs.append({"tokens": new, "logprobs": lps})
            entry["generate_s"] = time.perf_counter() - t0
            entry.update(ok=True, outputs=outputs)
            del model
        except Exception as exc:
            entry.update(ok=False, error=_error_text(exc), traceback=traceback.format_exc()[-4000:])
        gc.collect()
        out["results"].append(entry)
        _write(result_path, out)


def run_llamacpp(request: dict, out: dict, result_path: str) -> None:
    """llama.cpp through llama-cpp-python: greedy decoding with its KV cache, one token at a time, the
    log-probability of each chosen token from its logits (``logits_all``). A checkpoint's ``path`` is the
    GGUF file; prompts are token ids (the source checkpoint's tokenizer), fed as they are."""
    import numpy as np
    import llama_cpp

    out["engine_version"] = llama_cpp.__version__
    for ck in request["checkpoints"]:
        entry: dict = {"path": ck["path"]}
        ids_list = ck.get("prompts", request.get("prompts"))
        longest = max(len(ids) for ids in ids_list) + request["tokens"]
        stops = ck.get("stop_token_ids") or []
        llm = None
        try:
            t0 = time.perf_counter()
            llm = llama_cpp.Llama(model_path=ck["path"], n_ctx=max(longest, 64), n_batch=max(longest, 64),
                                  logits_all=True, seed=0, n_threads=os.cpu_count() or 1, verbose=False)
            entry["load_s"] = time.perf_counter() - t0
            entry["file_type"] = llm.metadata.get("general.file_type")
            t0 = time.perf_counter()
            outputs = []
            for ids in ids_list:
                llm.reset()
                llm.eval(ids)
                tokens, lps = [], []
                for _ in range(request["tokens"]):
                    logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
                    logp = logits - logits.max()
                    logp = logp - np.log(np.exp(logp).sum())
                    tok = int(np.argmax(logp))
                    tokens.append(tok)
                    lps.append(float(logp[tok]))
                    if tok in stops:
                        break
                    llm.eval([tok])
                outputs.append({"tokens": tokens, "logprobs": lps})
            entry["generate_s"] = time.perf_counter() - t0
            entry.update(ok=True, outputs=outputs)
        except Exception as exc:
            entry.update(ok=False, error=_error_text(exc), traceback=traceback.format_exc()[-4000:])
        finally:
            if llm is not None:
                llm.close()
            del llm
            gc.collect()
        out["results"].append(entry)
        _write(result_path, out)


def main(argv: list[str]) -> int:
    request_path, result_path = argv[1], argv[2]
    with open(request_path) as f:
        request = json.load(f)
    out = {"engine": request["engine"], "engine_version": None, "python": sys.executable, "results": []}
    _write(result_path, out)
    {"vllm": run_vllm, "transformers": run_transformers, "llamacpp": run_llamacpp}[request["engine"]](request, out, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
