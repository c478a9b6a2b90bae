"""Pure comparison of an engine's greedy generations with transformers' reference on the same prompts.

For each prompt the engine gives its greedy tokens and the log-probability of each; the reference gives,
scored teacher-forced on the *engine's* tokens, transformers' argmax and log-probability at each of those
positions (``reference.py``: where the argmax equals the engine's token everywhere, transformers' greedy
continuation is the engine's, token for token). Comparing on the engine's sequence keeps every position
comparable even after the two sequences part.

Verdicts:

* float checkpoints: the engine's tokens must equal transformers' greedy tokens exactly (same dtype on
  both sides: any other result means the engine computes a different function);
* quantized checkpoints: two kernels dequantize and accumulate in different orders, so exact tokens are not
  expected; the engine must agree with transformers running the same quantized checkpoint on the top-1
  token at ``min_top1`` of the positions, and the chosen tokens' log-probabilities must differ by at most
  ``max_dlogp``. Defaults come from measurements (README "Deploying the result").
"""

from __future__ import annotations

from dataclasses import dataclass, field

# From measurements on the CPU box (README "Deploying the result"; SmolLM2-135M, vLLM 0.32.0 CPU vs transformers,
# bf16 both sides, 6 default prompts). Two correct bf16 computations of the same function: float
# checkpoints 0.960-0.984 top-1, max |Δ| 0.18 (32 tokens); the six GPTQ 4-bit checkpoints of the serving
# tests (plain, and after each pruning stage; vLLM W4A16 vs GPTQModel, 16 tokens) 0.905-0.977 and
# 0.19-0.57; GPTQModel vs a float32 model of the hand-dequantized weights 0.958 / 0.191. A different
# function -- vLLM's W4A8 path, activations quantized to int8 -- gave 0.803 / 1.66. The thresholds sit
# between the two groups.
QUANTIZED_MIN_TOP1 = 0.85
QUANTIZED_MAX_DLOGP = 1.0

# A quantized GGUF is compared with the *float* checkpoint it came from (transformers cannot run llama.cpp's
# block formats), so the difference is the quantization error itself, not two kernels' rounding. Measured
# (SmolLM2-135M BI -7, 6 default prompts x 32 tokens, llama.cpp 0.3.36 vs transformers float32): f16 1.000 /
# 0.011 (exact tokens); q8_0 0.966 / 0.62; q4_k_m 0.863 / 1.26. The thresholds leave room under those for
# other prompts and models (about 0.1 top-1, 2x |Δ|); a wrong conversion (another model's weights, a lost
# bias, a wrong tokenizer) disagrees on most tokens and by many nats.
GGUF_THRESHOLDS = {"8bit": (0.90, 1.5), "low": (0.75, 3.0)}

# A float GGUF (f16/bf16) holds the source's float32 weights rounded to 16 bits: nearly the same function, not
# the same one, so a greedy token may flip where transformers' top two are a near tie. Measured: f16 files'
# max |Δ logprob| 0.007-0.011 (SmolLM2 stacks, benchmarks/results/gguf.json); the one flip seen (BI -7 +
# heal, f16) had |Δ| 0.01. A float GGUF passes when every position where the tokens part is such a tie:
# transformers prefers its own token over llama.cpp's by at most this many nats (5x the largest |Δ| seen).
GGUF_FLOAT_TIE_NATS = 0.05


def gguf_thresholds(quant: str) -> tuple[float, float]:
    """(min top-1, max |Δ logprob|) for a quantized GGUF of type ``quant`` (q8_0: 8-bit; else lower)."""
    return GGUF_THRESHOLDS["8bit" if quant.startswith("q8") else "low"]


@dataclass
class PromptAgreement:
    """One prompt: how far the engine and transformers agree."""

    prompt: int
    positions: int
    same_tokens: bool  # engine's greedy tokens == transformers' greedy tokens
    first_difference: int | None  # position of the first differing token (None: none)
    top1_agree: float  # share of positions where transformers' argmax == the engine's token
    max_dlogp: float  # max |engine logprob - transformers logprob| of the engine's tokens
    engine_token: int | None = None  # at first_difference
    reference_token: int | None = None
    # max over positions where transformers' argmax != the engine's token of (transformers' top log-prob -
    # its log-prob of the engine's token): how far from a tie the disagreements are (None: not given)
    max_disagreement_gap: float | None = None


@dataclass
class Verdict:
    ok: bool
    quantized: bool
    prompts: list[PromptAgreement]
    reasons: list[str] = field(default_factory=list)

    @property
    def top1_agree(self) -> float:
        total = sum(p.positions for p in self.prompts)
        return sum(p.top1_agree * p.positions for p in self.prompts) / total if total else 1.0

    @property
    def max_dlogp(self) -> float:
        return max((p.max_dlogp for p in self.prompts), default=0.0)

    @property
    def same_tokens(self) -> bool:
        return all(p.same_tokens for p in self.prompts)


def prompt_agreement(index: int, engine_tokens: list[int], engine_logprobs: list[float],
                     reference_tokens: list[int], forced_argmax: list[int],
                     forced_logprobs: list[float], forced_top_logprobs: list[float] | None = None) -> PromptAgreement:
    """``forced_*``: transformers teacher-forced on ``engine_tokens`` (one entry per engine token);
    ``forced_top_logprobs``: transformers' log-probability of its own argmax there."""
    if not (len(engine_tokens) == len(engine_logprobs) == len(forced_argmax) == len(forced_logprobs)):
        raise ValueError("engine tokens, engine logprobs and the teacher-forced reference differ in length")
    n = len(engine_tokens)
    first = next((i for i, (a, b) in enumerate(zip(engine_tokens, reference_tokens)) if a != b), None)
    if first is None and len(engine_tokens) != len(reference_tokens):
        first = min(len(engine_tokens), len(reference_tokens))
    agree = sum(a == t for a, t in zip(forced_argmax, engine_tokens))
    dlogp = max((abs(e - r) for e, r in zip(engine_logprobs, forced_logprobs)), default=0.0)
    gap = None
    if forced_top_logprobs is not None:
        gap = max((top - r for a, t, top, r in zip(forced_argmax, engine_tokens, forced_top_logprobs, forced_logprobs)
                   if a != t), default=0.0)
    return PromptAgreement(
        prompt=index, positions=n, same_tokens=first is None, first_difference=first,
        top1_agree=agree / n if n else 1.0, max_dlogp=dlogp,
        engine_token=engine_tokens[first] if first is not None and first < n else None,
        reference_token=reference_tokens[first] if first is not None and first < len(reference_tokens) else None,
        max_disagreement_gap=gap)


def judge(prompts: list[PromptAgreement], quantized: bool, min_top1: float = QUANTIZED_MIN_TOP1,
          max_dlogp: float = QUANTIZED_MAX_DLOGP, tie_nats: float | None = None) -> Verdict:
    """The verdict over all prompts, with the reasons it fails (empty when it passes). ``tie_nats`` (float
    checkpoints whose weights the engine holds rounded, e.g. an f16 GGUF of a float32 source): tokens may part
    at near ties only, where transformers prefers its own token by at most that many nats."""
    reasons: list[str] = []
    verdict = Verdict(ok=False, quantized=quantized, prompts=prompts)
    if not quantized:
        for p in prompts:
            if not p.same_tokens and tie_nats is not None and p.max_disagreement_gap is not None \
                    and p.max_disagreement_gap <= tie_nats:
                continue  # parted at a near tie only
            if not p.same_tokens:
                reasons.append(f"prompt {p.prompt}: tokens differ from position {p.first_difference} "
                               f"(engine {p.engine_token}, transformers {p.reference_token})")
    else:
        if verdict.top1_agree < min_top1:
            reasons.append(f"top-1 agreement {verdict.top1_agree:.3f} is below {min_top1:.3f}")
        if verdict.max_dlogp > max_dlogp:
            worst = max(prompts, key=lambda p: p.max_dlogp)
            reasons.append(f"max |Δ logprob| {verdict.max_dlogp:.3f} (prompt {worst.prompt}) is above {max_dlogp:.3f}")
    verdict.reasons = reasons
    verdict.ok = not reasons
    return verdict
