"""Draws build/bench/chart.png: ops/s per configuration and thread count, one panel per
operation (log scale, so direct SoftHSM2 and the remoting configurations fit on one
axis), and a panel for the modeled HSMs' scaling with the member count."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from report import CONFIGS, TITLES  # noqa: E402
from targets import clean, find_run  # noqa: E402

COLORS = {"direct": "#4c72b0", "p11p": "#dd8452", "p11p-balance": "#c44e52", "p11-kit": "#55a868"}


def draw(results: dict, path: Path) -> None:
    m = results.get("matrix", {})
    ops, threads = m.get("ops", []), m.get("threads", [])
    configs = [c for c in CONFIGS if c in m.get("configs", [])]
    panels = len(ops) + (1 if results.get("modeled") else 0)
    cols = 4
    rows = max(1, -(-panels // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    width = 0.8 / max(1, len(configs))
    for i, op in enumerate(ops):
        ax = axes[i // cols][i % cols]
        for j, config in enumerate(configs):
            for k, t in enumerate(threads):
                run = find_run(results, config, op, t)
                x = k + (j - (len(configs) - 1) / 2) * width
                if clean(run):
                    value = run["ops_per_s"]  # type: ignore[index]
                    ax.bar(x, value, width, color=COLORS[config])
                    ax.annotate(_short(value), (x, value), ha="center", va="bottom",
                                fontsize=6.5, rotation=90, xytext=(0, 2),
                                textcoords="offset points")
                else:  # failed or not run: a mark at the bottom instead of a bar
                    ax.annotate("✗", (x, 0), xycoords=("data", "axes fraction"),
                                ha="center", va="bottom", color=COLORS[config], fontsize=12)
        ax.set_yscale("log")
        ax.set_xlim(-0.5, len(threads) - 0.5)
        ax.margins(y=0.25)
        ax.set_title(op, fontsize=11, fontweight="bold")
        ax.set_xticks(range(len(threads)), [f"{t} thr" for t in threads])
        ax.set_ylabel("ops/s (log)")
        ax.grid(axis="y", which="major", alpha=0.3)
    if results.get("modeled"):
        _modeled(axes[len(ops) // cols][len(ops) % cols], results["modeled"])
    for i in range(panels, rows * cols):
        axes[i // cols][i % cols].axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[c]) for c in configs]
    top = 1 - 0.9 / (3.6 * rows)
    if configs:  # none without the matrix (--only)
        fig.legend(handles, [TITLES[c] for c in configs], loc="upper center", ncol=len(configs),
                   frameon=False, fontsize=11, bbox_to_anchor=(0.5, top + 0.35 / (3.6 * rows)))
    fig.suptitle("p11p benchmark — operations per second, higher is better "
                 "(✗: errors, or the operation is not supported)", y=0.998, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(value: float) -> str:
    return f"{value / 1000:.0f}k" if value >= 10000 else f"{value / 1000:.1f}k" if value >= 1000 \
        else f"{value:.0f}"


def _modeled(ax, mo: dict) -> None:  # type: ignore[no-untyped-def]
    members = sorted(mo.get("members", {}), key=int)
    values = [mo["members"][n].get("ops_per_s") or 0 for n in members]
    ax.bar(range(len(members)), values, 0.6, color=COLORS["p11p-balance"])
    if values and values[0]:
        ax.plot(range(len(members)), [values[0] * int(n) for n in members], "k--", lw=1,
                label="linear scaling")
        ax.legend(fontsize=8, loc="upper left")
    for x, (n, v) in enumerate(zip(members, values, strict=True)):
        s = mo.get("scaling", {}).get(n)
        ax.annotate(f"{s:.2f}×" if s else "", (x, v), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(members)), [f"{n} member{'s' if n != '1' else ''}" for n in members])
    ax.set_title(f"modeled HSMs: {mo['threads']}-thread ECDSA", fontsize=11, fontweight="bold")
    ax.set_ylabel("ops/s")
    ax.grid(axis="y", alpha=0.3)
