"""Figures from runs: loss curves from metrics.jsonl, codebook usage, image grids."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vqgpt.files import atomic_path  # noqa: E402


def save_figure(fig, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def codebook_histogram(histogram: np.ndarray, path: str | os.PathLike, title: str = "codebook usage") -> None:
    """Code frequencies sorted from most to least used, log scale: collapse shows as a cliff."""
    counts = np.sort(np.asarray(histogram, dtype=np.float64))[::-1]
    used = int((counts > 0).sum())
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(np.arange(len(counts)), np.maximum(counts, 0.5), width=1.0, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("code rank")
    ax.set_ylabel("count")
    ax.set_title(f"{title}: {used}/{len(counts)} codes used ({100 * used / max(len(counts), 1):.1f}%)")
    save_figure(fig, path)


def _series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _panel_grid(panels: list[tuple[str, str, str]], records: list[dict], path, title: str) -> list[str]:
    """One small axis per (kind, key, label) that has data; returns the labels drawn."""
    present = [(kind, key, label) for kind, key, label in panels if _series(records, kind, key)[0]]
    if not present:
        return []
    columns = min(3, len(present))
    rows = (len(present) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.8 * rows), squeeze=False)
    for ax, (kind, key, label) in zip(axes.flat, present):
        steps, values = _series(records, kind, key)
        ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return [label for _, _, label in present]


VQGAN_PANELS = [("train", "l1", "L1 (train)"), ("train", "lpips", "LPIPS (train)"),
                ("train", "quant_loss", "quantizer loss"), ("train", "g_loss", "generator GAN loss"),
                ("train", "d_loss", "discriminator loss"), ("train", "disc_weight", "adaptive GAN weight"),
                ("eval", "psnr", "val PSNR (dB)"), ("eval", "ssim", "val SSIM"),
                ("eval", "codebook_usage", "val codebook usage (share of codes)"), ("eval", "rfid", "val rFID")]
GPT_PANELS = [("train", "loss", "train loss (nats/token)"), ("eval", "val_loss", "val loss (nats/token)"),
              ("train", "lr", "learning rate"), ("eval", "gfid", "gFID (--eval-fid-samples)"),
              ("eval", "isc_mean", "Inception Score")]


def vqgan_figures(records: list[dict], path) -> list[str]:
    return _panel_grid(VQGAN_PANELS, records, path, "VQGAN training")


def gpt_figures(records: list[dict], path) -> list[str]:
    return _panel_grid(GPT_PANELS, records, path, "GPT training")
