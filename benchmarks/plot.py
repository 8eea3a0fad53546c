"""Draws a benchmarks/results/<name>.json of memory_speed.py as a PNG: activation memory per
method for each shape (grouped by sequence length where a shape ran several, as llama-3-8b does),
the longest sequence each arm trained within the memory cap where the run searched for it, and
activation memory against depth and against sequence length where the run has those sweeps.

    python benchmarks/plot.py benchmarks/results/h200.json   # writes benchmarks/results/h200.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _is_meft_exact(method: str) -> bool:
    return method.startswith("meft") and "float" not in method and "vanilla" not in method


def _color(method: str) -> str:
    return "tab:orange" if _is_meft_exact(method) else "tab:gray"


def _grouped_bars(ax, data: list[dict]) -> None:
    """Activation memory per arm, one bar per sequence length."""
    methods = list(dict.fromkeys(r["method"] for r in data))
    seqs = sorted({r["seq"] for r in data})
    width = 0.8 / len(seqs)
    cmap = plt.get_cmap("viridis")
    for i, seq in enumerate(seqs):
        values = {r["method"]: r["activation_gib"] for r in data if r["seq"] == seq}
        xs = [j + (i - (len(seqs) - 1) / 2) * width for j, m in enumerate(methods) if m in values]
        ys = [values[m] for m in methods if m in values]
        ax.bar(xs, ys, width, label=f"1 x {seq}", color=cmap(i / max(1, len(seqs) - 1) * 0.8))
    ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right")
    ax.legend(title="batch x sequence")


def _max_context(ax, rows: list[dict]) -> None:
    methods = [r["method"] for r in rows]
    values = [(r["max_context"] or 0) / 1024 for r in rows]
    bars = ax.bar(methods, values, color=[_color(m) for m in methods])
    for bar, r in zip(bars, rows):
        # a search that never failed (or stopped early) found a lower bound
        bound = "≥ " if r.get("first_failing") is None else ""
        ax.annotate(f"{bound}{(r['max_context'] or 0) // 1024}k", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("longest sequence trained (k tokens)")
    ax.tick_params(axis="x", rotation=60)
    ax.set_title(f"{rows[0]['shape']}, batch 1, within {rows[0]['cap_gib']:g} GiB of GPU memory")


def main(path: Path) -> None:
    results = json.loads(path.read_text())
    rows = [r for r in results["memory_speed"] if "error" not in r]
    main_rows = [r for r in rows if r.get("sweep") is None]
    shapes = list(dict.fromkeys(r["shape"] for r in main_rows))
    searches = {}
    for r in results.get("max_context", []):
        searches.setdefault(r["shape"], []).append(r)
    sweeps = [(name, key, label) for name, key, label in (
        ("depth", "layers", "layers (OPT-1.3b width, batch 8 x 512)"),
        ("seq", "seq", "sequence length (OPT-1.3b, batch 2)"),
    ) if any(r.get("sweep") == name for r in rows)]
    panels = len(shapes) + len(searches) + len(sweeps)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5), squeeze=False)
    col = 0
    for shape in shapes:
        data = [r for r in main_rows if r["shape"] == shape]
        ax = axes[0][col]
        if len({r["seq"] for r in data}) > 1:
            _grouped_bars(ax, data)
            ax.set_title(f"{shape}, bf16 (orange labels: exact MEFT)")
            for label in ax.get_xticklabels():
                label.set_color(_color(label.get_text()))
        else:
            ax.bar([r["method"] for r in data], [r["activation_gib"] for r in data], color=[_color(r["method"]) for r in data])
            ax.tick_params(axis="x", rotation=60)
            ax.set_title(f"{shape}, batch {data[0]['batch']} x {data[0]['seq']}, bf16")
        ax.set_ylabel("activation memory (GiB)")
        col += 1
        if shape in searches:
            _max_context(axes[0][col], searches.pop(shape))
            col += 1
    for rows_of_shape in searches.values():  # a search without memory rows
        _max_context(axes[0][col], rows_of_shape)
        col += 1
    for name, key, label in sweeps:
        ax = axes[0][col]
        col += 1
        data = [r for r in rows if r.get("sweep") == name]
        for method in dict.fromkeys(r["method"] for r in data):
            points = sorted((r[key], r["activation_gib"]) for r in data if r["method"] == method)
            ax.plot(*zip(*points), marker="o", label=method)
        ax.set_xlabel(label)
        ax.set_ylabel("activation memory (GiB)")
        ax.set_ylim(bottom=0)
        ax.legend()
    for extra in axes[0][col:]:
        extra.set_visible(False)
    env = results["environment"]
    fig.suptitle(f"{env['gpu']}, torch {env['torch']}, transformers {env['transformers']} ({env['date']})")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
