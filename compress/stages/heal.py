"""Stage ``heal``: recover quality after pruning by distilling the pruned model toward the model
as loaded (the teacher), LoRA merged back into the weights or full training of chosen modules.

Sample yaml::

    - layer_removal: {metric: bi, remove: 7}
    - heal: {steps: 200, lr: 2.0e-4, rank: 16}                  # LoRA on every attention/MLP linear
    - heal: {method: full, layers: next_to_removed, lr: 2.0e-5}  # or full weights beside the cut

Loss (compress.heal.loss): token-level KL(teacher || student) on the teacher's top-k log-probs with
the rest of the mass as one bucket, the quantity ``evaluate.fidelity`` reports, optionally mixed
with the next-token LM loss: (1 - lm_weight) KL_k + lm_weight CE. The teacher's top-k are computed
once by the pipeline before the first stage changes any weight, into a baseline-logits store in the
run folder (state/teacher-<stage>/, memory-mapped, compress.evaluate.fidelity), so teacher and
student never sit in memory together. The default ``top_k: 64`` keeps 87-89% of the full-vocabulary
KL on SmolLM2-135M after BI -7 (benchmarks/fidelity_topk.py): the mass the teacher spreads over the
remaining ~49k tokens is matched as one bucket, not token by token.

Data: the stage's own ``calibration`` (same keys as the top-level one) or the recipe's; the last
``validation_samples`` windows are held out (with ``sampling: strided`` they are other text).

:param method: ``lora`` (peft adapters, merged at the end: the checkpoint is a plain model) or
    ``full`` (the weights of ``target_modules`` in ``layers`` train).
:param rank, alpha, dropout: LoRA rank r, scale alpha (update = alpha / r · B A), adapter dropout.
:param target_modules: linear module names inside each decoder layer (default: every attention
    and MLP projection of the Llama layout).
:param layers: ``all``, ``next_to_removed`` (the layers beside a removed one) or current indices.
:param top_k: teacher log-probs kept per position. :param lm_weight: share of the LM loss.
:param steps / epochs: optimizer steps, or passes over the training windows (default 1 epoch).
:param lr: peak learning rate (default 2e-4 for lora, 2e-5 for full), ``warmup_ratio`` of the
    steps linear warm-up, then cosine to ``min_lr_ratio`` x lr. AdamW with ``weight_decay``,
    gradients clipped to ``max_grad_norm`` (0: off).
:param batch_size, grad_accum: windows per forward pass; passes per optimizer step.
:param dtype: ``auto`` (bf16 autocast on CUDA, the weights' dtype on CPU), ``float32``, ``bfloat16``.
:param gradient_checkpointing: recompute activations in the backward pass (less memory, slower).
:param eval_every: validation KL every N steps. :param checkpoint_every: resumable checkpoint every N steps.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from compress.data.sources import CalibrationConfig
from compress.errors import CompressError
from compress.heal.adapters import chosen_layers, merge_lora, target_names, unfreeze, wrap_lora
from compress.heal.loop import Settings, train
from compress.heal.schedule import total_steps
from compress.heal.teacher import windows_of
from compress.stages.base import ModelFacts, StageConfig, StageContext, StageRecord

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class HealConfig(StageConfig):
    method: Literal["lora", "full"] = "lora"
    rank: int = Field(16, ge=1, le=4096)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(PROJECTIONS), min_length=1)
    layers: Literal["all", "next_to_removed"] | list[int] = "all"
    top_k: int = Field(64, ge=1, le=1_000_000)
    lm_weight: float = Field(0.0, ge=0.0, le=1.0)
    calibration: CalibrationConfig | None = None
    validation_samples: int = Field(8, ge=0)
    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    gradient_checkpointing: bool = False
    eval_every: int = Field(25, ge=1)
    checkpoint_every: int = Field(50, ge=1)

    @model_validator(mode="after")
    def _one_length(self):
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        if self.calibration is not None and self.calibration.samples <= self.validation_samples:
            raise ValueError(f"calibration.samples ({self.calibration.samples}) must exceed validation_samples "
                             f"({self.validation_samples}): the last validation_samples windows are held out")
        return self

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.method == "lora" else 2e-5)


def autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    if choice == "bfloat16" or (choice == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class Heal:
    name: ClassVar[str] = "heal"
    Config: ClassVar = HealConfig
    needs_calibration: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = True  # the pipeline builds ctx.teacher before the first stage
    needs_pruned_model: ClassVar[bool] = True  # the recipe check wants a pruning stage before it
    changes_depth: ClassVar[bool] = False
    quantizes: ClassVar[bool] = False
    replayable: ClassVar[bool] = False  # its checkpoint is the resume point
    # its own calibration is token windows read batch by batch (no hidden state per token is kept),
    # so the recipe check's "calibration hidden states fit in memory" does not apply to it
    streams_calibration: ClassVar[bool] = True

    def __init__(self, config: HealConfig) -> None:
        self.config = config

    def check(self, facts: ModelFacts) -> list[str]:
        if facts.quantized:
            return ["the model is quantized; heal trains float weights: put it before quantization"]
        return []

    def facts_after(self, facts: ModelFacts) -> ModelFacts:
        return facts

    def settings(self, train_windows: int) -> Settings:
        c = self.config
        steps = total_steps(train_windows, c.batch_size, c.grad_accum, c.steps, c.epochs)
        return Settings(total_steps=steps, batch_size=c.batch_size, grad_accum=c.grad_accum, lr=c.peak_lr(),
                        warmup_steps=int(round(c.warmup_ratio * steps)), min_lr_ratio=c.min_lr_ratio,
                        weight_decay=c.weight_decay, max_grad_norm=c.max_grad_norm, lm_weight=c.lm_weight,
                        seed=c.seed, eval_every=c.eval_every, checkpoint_every=c.checkpoint_every,
                        autocast=None, fingerprint=c.model_dump_json())

    def apply(self, model, ctx: StageContext) -> StageRecord:
        start, c = time.perf_counter(), self.config
        windows = windows_of(ctx.calibration).to(ctx.device)
        n, seq_len = windows.shape
        if n <= c.validation_samples:
            raise CompressError(f"heal.validation_samples: {c.validation_samples} of {n} windows held out leaves "
                                "none to train on; raise calibration.samples or lower validation_samples")
        if ctx.teacher is None:
            raise CompressError("heal: no teacher store; the pipeline builds it before the first stage "
                                "(direct callers: compress.heal.teacher.build_teacher_store)")
        if ctx.teacher.meta["positions"] != n * (seq_len - 1):
            raise AssertionError("teacher store and heal windows differ")
        layers = chosen_layers(c.layers, len(ctx.original_layer_ids), ctx.original_layer_ids,
                               ctx.original_num_layers)
        names = target_names(model, layers, c.target_modules)
        torch.manual_seed(c.seed)  # LoRA's initial A, dropout masks
        if c.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if c.method == "lora":
            trained = wrap_lora(model, names, c.rank, c.alpha, c.dropout)
        else:
            unfreeze(model, names)
            trained = model
        n_trained = sum(p.numel() for p in trained.parameters() if p.requires_grad)
        settings = self.settings(n - c.validation_samples)
        settings.autocast = autocast_dtype(c.dtype, ctx.device)
        folder = ctx.work_folder or Path(tempfile.mkdtemp(prefix="compress-heal-"))
        result = train(trained, windows, list(range(n - c.validation_samples)), list(range(n - c.validation_samples, n)),
                       ctx.teacher, settings, folder, ctx.log, ctx.progress)
        model = merge_lora(trained) if c.method == "lora" else trained
        model.requires_grad_(False)
        if c.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.eval()
        wall = time.perf_counter() - start
        return StageRecord(
            stage=self.name,
            summary=(f"healed by top-{c.top_k} distillation ({c.method}, {len(names)} modules in {len(layers)} "
                     f"layers): {result['steps']} steps, {result['tokens_seen']} tokens, validation KL "
                     f"{result['initial_val_kl']:.4f} -> {result['final_val_kl']:.4f}"),
            details={**result, "method": c.method, "trained_parameters": n_trained, "layers": layers,
                     "top_k": c.top_k, "lm_weight": c.lm_weight, "lr": settings.lr,
                     "teacher_store_bytes": ctx.teacher.nbytes(), "train_windows": n - c.validation_samples,
                     "validation_windows": c.validation_samples, "seq_len": seq_len, "wall_s": wall},
            wall_s=wall, new_model=model,
        )

    def replay(self, model, record: dict[str, Any]) -> None:
        raise AssertionError("heal is not replayable: the pipeline resumes it from its checkpoint")
