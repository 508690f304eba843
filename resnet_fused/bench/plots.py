"""Speedup-over-eager bar charts, one PNG per suite (matplotlib, headless)."""

from __future__ import annotations

import os
from collections import defaultdict


def speedup_plots(rows: list[dict], env: dict, out_dir: str) -> list[str]:
    """Writes <out_dir>/<suite>.png: per case, each provider's time as a multiple of eager's speed.
    Returns the paths written (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    by_suite = defaultdict(list)
    for r in rows:
        if r.get("speedup_vs_eager") is not None:  # not failed, eager measured
            by_suite[r["suite"]].append(r)
    for suite, suite_rows in by_suite.items():
        cases = list(dict.fromkeys(_label(r) for r in suite_rows))
        providers = [p for p in dict.fromkeys(r["provider"] for r in suite_rows) if p != "eager"]
        speed = {(_label(r), r["provider"]): r["speedup_vs_eager"] for r in suite_rows}
        fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(cases) * max(len(providers), 1) + 2), 4.5))
        width = 0.8 / max(len(providers), 1)
        for i, p in enumerate(providers):
            xs = [j + i * width for j in range(len(cases))]
            ax.bar(xs, [speed.get((c, p), 0.0) for c in cases], width, label=p)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("speed vs eager (x)")
        ax.set_title(f"resnet_fused {suite}: {env['device']}, torch {env['torch']}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{suite}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _label(r: dict) -> str:
    what = r.get("case") or r.get("op")
    mode = r.get("mode") or r.get("layout", "")
    return f"{what} {mode} {r['dtype']} {r['shape'].split('x')[0]}"
