"""Pictures people would rather look at than read: captions under images, query galleries."""
from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .runtime import load_image  # noqa: E402


def caption_grid(paths: list[str], generated: list[str], references: list[str], out: str, cols: int = 4) -> None:
    rows = (len(paths) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 5.4 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, p, g, r in zip(axes.flat, paths, generated, references):
        ax.imshow(load_image(p, 224))
        ax.set_title("\n".join(textwrap.wrap(f"gen: {g}", 48) + textwrap.wrap(f"ref: {r}", 48)), fontsize=8, loc="left")
    fig.savefig(out, dpi=80)
    plt.close(fig)


def retrieval_gallery(queries: list[str], results: list[list[tuple[str, float, bool]]], out: str) -> None:
    """One row per text query: its top images, with scores; a green frame marks the true image."""
    k = max(len(r) for r in results)
    fig, axes = plt.subplots(len(queries), k, figsize=(2.4 * k, 2.9 * len(queries)), squeeze=False)
    for row, (q, res) in enumerate(zip(queries, results)):
        for col in range(k):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(res):
                ax.axis("off")
                continue
            path, score, hit = res[col]
            ax.imshow(load_image(path, 160))
            for s in ax.spines.values():
                s.set_edgecolor("limegreen" if hit else "lightgrey")
                s.set_linewidth(4 if hit else 1)
            ax.set_xlabel(f"{score:.3f}", fontsize=8)
        axes[row, 0].set_title("\n".join(textwrap.wrap(q, 60)), fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def training_curves(curves: dict[str, list[tuple[int, float]]], out: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
