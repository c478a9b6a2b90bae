"""Our ``gptq`` stage vs GPTQModel called directly (its README's load -> quantize -> save), same
model, same calibration token ids, same settings, in one process, alternating A B A B ...

    python benchmarks/quantize.py --assets ../shared-cache --repeats 3 --out benchmarks/results

A (ours): ``load_model`` -> ``GPTQ.apply`` (writes the float model to a temporary folder, GPTQModel
load/quantize/save, reloads the saved checkpoint for evaluation) -> ``GPTQ.save`` (copies it).
B (direct): ``GPTQModel.load(path, QuantizeConfig(...))`` -> ``.quantize(calibration)`` -> ``.save``.
Both start from the model folder on disk and end with a GPTQ checkpoint on disk. The time ratio is
median(A) / median(B); the quantized tensors (qweight, scales, qzeros, g_idx) of every saved
checkpoint are compared byte for byte with the first one (ours, repeat 0). Timers around GPTQModel's
load/quantize/save and the reload inside our ``apply`` give a load-independent figure too: the
seconds ours adds over GPTQModel's own calls in the same run (``added_by_ours_s``, ``ratio_same_run``).
GPTQMODEL_CPU_WORKERS is fixed before GPTQModel is imported (GPTQModel builds its thread pool once
a process), to the value our stage sets, so both sides run on the same pool.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))  # as compress.stages.gptq does

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from compress.data.local import load_local_texts  # noqa: E402
from compress.data.tokens import calibration_batches, tokenize_documents  # noqa: E402
from compress.model_io import load_model  # noqa: E402
from compress.stages.base import StageContext  # noqa: E402
from compress.stages.gptq import GPTQ, GPTQConfig  # noqa: E402

QUANT = dict(bits=4, group_size=64, sym=True, desc_act=False, act_group_aware=False, damp_percent=0.01)
PACKED = ("qweight", "scales", "qzeros", "g_idx")


def windows(model_dir: Path, book: Path, samples: int, seq_len: int):
    """(tokenizer, batches of 4 windows as the pipeline makes them, the same rows one per dict)."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    batches = calibration_batches(tokenize_documents(tok, load_local_texts(book), 200_000), samples, seq_len, 0, 4)
    rows = [{"input_ids": r[None], "attention_mask": m[None]}
            for b in batches for r, m in zip(b["input_ids"], b["attention_mask"])]
    return tok, batches, rows


_ACTIVE: list[str] = []  # timed calls in progress: a call made inside another timed one is not counted


@contextlib.contextmanager
def timing(owner, name: str, phases: dict, key: str):
    """Add the seconds spent in outermost ``owner.name(...)`` calls to ``phases[key]`` (a timer only)."""
    own = name in vars(owner)
    original = inspect.getattr_static(owner, name)
    bound = getattr(owner, name)

    def timed(*a, **k):
        if _ACTIVE:
            return bound(*a, **k)
        _ACTIVE.append(key)
        start = time.perf_counter()
        try:
            return bound(*a, **k)
        finally:
            _ACTIVE.pop()
            phases[key] = phases.get(key, 0.0) + time.perf_counter() - start

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original) if own else delattr(owner, name)


def ours(model_dir: Path, tok, batches, out: Path) -> dict:
    """Ours, with timers on the GPTQModel calls and the reload inside ``apply``: the rest of
    ``apply_s`` (writing the float model, bookkeeping) is what the stage adds."""
    from gptqmodel import GPTQModel
    from gptqmodel.models.base import BaseQModel

    phases, t0 = {}, time.perf_counter()
    model, _ = load_model(str(model_dir), dtype=torch.float32, device=torch.device("cpu"))
    phases["load_s"] = time.perf_counter() - t0
    stage = GPTQ(GPTQConfig(**QUANT))
    ctx = StageContext(batches, tok, torch.device("cpu"), list(range(model.config.num_hidden_layers)),
                       logging.getLogger("bench"), progress=False)
    t1 = time.perf_counter()
    with timing(GPTQModel, "load", phases, "in_apply_gptqmodel_load_s"), \
            timing(BaseQModel, "quantize", phases, "in_apply_gptqmodel_quantize_s"), \
            timing(BaseQModel, "save", phases, "in_apply_gptqmodel_save_s"), \
            timing(transformers.PreTrainedModel, "save_pretrained", phases, "in_apply_save_float_s"), \
            timing(transformers.AutoModelForCausalLM, "from_pretrained", phases, "in_apply_reload_s"):
        record = stage.apply(model, ctx)
    phases["apply_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    out.mkdir(parents=True)
    stage.save(record.new_model, out)
    phases["save_s"] = time.perf_counter() - t2
    phases["total_s"] = time.perf_counter() - t0
    inside = sum(phases[f"in_apply_gptqmodel_{k}_s"] for k in ("load", "quantize", "save"))
    phases["added_by_ours_s"] = phases["total_s"] - inside  # everything but GPTQModel's own three calls
    phases["ratio_same_run"] = phases["total_s"] / inside
    shutil.rmtree(stage._saved.parent, ignore_errors=True)  # the stage's temporary folder
    return phases


def direct(model_dir: Path, rows, out: Path) -> dict:
    from gptqmodel import GPTQModel, QuantizeConfig

    phases, t0 = {}, time.perf_counter()
    gm = GPTQModel.load(str(model_dir), QuantizeConfig(**QUANT), device="cpu")
    phases["load_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    gm.quantize(rows, batch_size=1)
    phases["quantize_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    gm.save(str(out))
    phases["save_s"] = time.perf_counter() - t2
    phases["total_s"] = time.perf_counter() - t0
    return phases


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Which tensors differ (missing, shape, dtype or bytes); and how many packed ones were compared."""
    diff = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x.contiguous().view(torch.uint8),
                                                                        y.contiguous().view(torch.uint8)):
            diff.append(k)
    packed = [k for k in a if k.rsplit(".", 1)[-1] in PACKED]
    return {"differ": diff, "packed_compared": len(packed), "tensors_compared": len(set(a) & set(b))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, default=Path("../shared-cache"))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of ours on 4 windows first")
    ap.add_argument("--shared", default="", help="note on other load on the machine, recorded as is")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    import gptqmodel

    model_dir = args.assets / "models/smollm2-135m-instruct"
    tok, batches, rows = windows(model_dir, args.assets / "books/austen-emma.txt", args.samples, args.seq_len)
    work = Path(tempfile.mkdtemp(prefix="quantbench-"))
    runs = {"ours": [], "direct": []}
    reference, checks = None, []
    try:
        for i in range(args.warmup):  # GPTQModel's thread pool, lazy imports, kernel compile: once a process
            ours(model_dir, tok, batches[:1], work / f"warmup{i}")
            shutil.rmtree(work / f"warmup{i}")
        for i in range(args.repeats):
            for name in ("ours", "direct"):
                folder = work / f"{name}{i}"
                load = os.getloadavg()[0]
                phases = ours(model_dir, tok, batches, folder) if name == "ours" else direct(model_dir, rows, folder)
                runs[name].append({**phases, "loadavg_1min_before": load})
                print(name, i, json.dumps(phases), flush=True)
                got = tensors(folder)
                if reference is None:
                    reference = got
                else:
                    checks.append({"run": f"{name}{i}", **differences(got, reference)})
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(r["total_s"] for r in v) for k, v in runs.items()}
    identical = all(not c["differ"] for c in checks)
    result = {
        "command": "python " + shlex.join(sys.argv),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
                   f"GPTQMODEL_CPU_WORKERS={os.environ['GPTQMODEL_CPU_WORKERS']}",
        "shared_machine": args.shared or "not stated",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "gptqmodel": gptqmodel.__version__},
        "model": str(model_dir.name), "calibration": f"{args.samples} x {args.seq_len} tokens of Emma, seed 0",
        "warmup_runs": args.warmup,
        "settings": QUANT, "runs": runs, "median_total_s": med, "ratio_ours_over_direct": med["ours"] / med["direct"],
        "paired_ratios": [a["total_s"] / b["total_s"] for a, b in zip(runs["ours"], runs["direct"])],
        "median_ratio_same_run": statistics.median(r["ratio_same_run"] for r in runs["ours"]),
        "identical": identical, "comparisons": checks,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("median_total_s", "ratio_ours_over_direct", "paired_ratios",
                                             "median_ratio_same_run", "identical")}, indent=2))


if __name__ == "__main__":
    main()
