"""Training curves as a PNG: loss, top-1 error (train and val) and learning rate per epoch."""

from __future__ import annotations

from pathlib import Path


def training_curves(history: list[dict], path: str | Path, title: str) -> str | Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    axes[0].plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    axes[0].set_title("loss")
    axes[1].plot(epochs, [100 * h["train_top1_error"] for h in history], "o-", label="train")
    axes[1].plot(epochs, [100 * h["val_top1_error"] for h in history], "o-", label="val")
    axes[1].set_title("top-1 error (%)")
    axes[2].plot(epochs, [h["lr"] for h in history], "o-")
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)


def save_png(fig, path: str | Path) -> str | Path:
    """Write a figure to a path or a storage URI, atomically, and close it."""
    import io

    import matplotlib.pyplot as plt

    from .. import storage

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(path, buffer.getvalue())
    return path
