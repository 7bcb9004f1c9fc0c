"""What the user sees: epoch lines, ``metrics.jsonl``, loss/accuracy curves and the confusion matrix."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion_matrix.png"


class MetricsLog:
    """One JSON object per epoch in ``<output>/metrics.jsonl``."""

    def __init__(self, directory: Path, write: bool = True):
        self.path = Path(directory) / METRICS_FILE
        self.write = write  # False: read only (the processes of a run other than process 0)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a crash: everything after it is rewritten on resume
        return out

    def keep_before(self, epoch: int) -> list[dict]:
        """On resume: drop records of epochs that will be trained again."""
        kept = [r for r in self.read() if r.get("epoch", 0) < epoch]
        if not self.write:
            return kept
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        return kept

    def clear(self) -> None:
        """A new run starts an empty log."""
        if self.write:
            self.path.write_text("")

    def append(self, record: dict) -> None:
        if not self.write:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()


def epoch_line(r: dict, epochs: int) -> str:
    parts = [f"epoch {r['epoch'] + 1}/{epochs}",
             f"train loss {r['train_loss']:.4f} acc {r['train_top1']:.4f}",
             f"val loss {r['val_loss']:.4f} top1 {r['val_top1']:.4f} top5 {r['val_top5']:.4f}",
             f"lr {r['lr']:.3g}", f"{r['seconds']:.1f}s"]
    if r.get("target_val_top1") is not None:
        parts.insert(3, f"target top1 {r['target_val_top1']:.4f}")
    if r.get("ema_val_top1") is not None:
        parts.insert(3, f"ema val loss {r['ema_val_loss']:.4f} top1 {r['ema_val_top1']:.4f}")
    if r.get("domain_acc") is not None:
        parts.insert(-2, f"domain acc {r['domain_acc']:.3f} (lambda {r['dann_lambda']:.2f})")
    if r.get("strategy_stage") is not None:
        parts.insert(1, f"stage {r['strategy_stage']}")
    return " | ".join(parts)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(preds, np.int64)), 1)
    return cm


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    totals = cm.sum(axis=1)
    return np.where(totals > 0, np.diag(cm) / np.maximum(totals, 1), np.nan)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: Sequence[dict], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    epochs = [r["epoch"] + 1 for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in records], "o-", label="validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(epochs, [r["train_top1"] for r in records], "o-", label="train top-1")
    ax_acc.plot(epochs, [r["val_top1"] for r in records], "o-", label="validation top-1")
    ax_acc.plot(epochs, [r["val_top5"] for r in records], "--", label="validation top-5")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    stage_starts = [r["epoch"] + 1 for prev, r in zip(records, records[1:])
                    if r.get("strategy_stage") != prev.get("strategy_stage")]
    for x in stage_starts:
        for ax in (ax_loss, ax_acc):
            ax.axvline(x - 0.5, color="grey", lw=0.8, ls=":")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    n = len(class_names)
    size = min(max(4.0, 0.45 * n + 2), 24)
    fig, ax = plt.subplots(figsize=(size, size))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(n)
    labels = [str(c)[:18] for c in class_names]
    ax.set_xticks(ticks, labels, rotation=90 if n > 10 else 0, fontsize=8 if n > 20 else 10)
    ax.set_yticks(ticks, labels, fontsize=8 if n > 20 else 10)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_title(title or "validation confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
