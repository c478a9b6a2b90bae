"""The heal stage's loss curve (train loss per step, validation KL) for the run report."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_heal_curve(stage: dict[str, Any], path: Path) -> bool:
    """Train loss and validation KL vs optimizer step. False if the stage has no curve."""
    curve = stage.get("details", {}).get("curve")
    if not curve or not curve.get("step"):
        return False
    from compress.report import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=120)
    ax.plot(curve["step"], curve["train_loss"], lw=1, alpha=0.6, label="train loss")
    ax.plot(curve["val_step"], curve["val_kl"], marker="o", label="validation KL (top-k, held out)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / token (log)")
    ax.set_title(f"{stage['name']}: distillation toward the model as loaded", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return True
