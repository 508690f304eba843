"""The GPU performance targets (issue 6), each with its measured ratio, from benchmark results.json files.

    python benchmarks/targets.py --kernels K.json --models M.json [--graphs G.json]

K: `python -m resnet_fused.bench --suite ops --suite convs --dtype bf16 --batch 256 ...`;
M: `--suite models --dtype bf16 --batch 1 --batch 256 --compile default --compile max-autotune`;
G: the models suite at batch 1 again with `--cuda-graphs` (every provider replayed as a CUDA graph).
"fused" is the best of the fused providers (fused-cuda, fused-cuda-cudnn-graphs, fused-triton, tuned), named in each line.
Prints one line per target: measured, required, met or MISSED. Every number is read from the files.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable

FUSED = ("fused-cuda", "fused-cuda-cudnn-graphs", "fused-triton", "tuned")


def _rows(path: str | None) -> list[dict]:
    if not path or not os.path.exists(path):  # a part that did not run: its targets show "not measured"
        return []
    with open(path) as f:
        return json.load(f)["results"]


def _best(rows: Iterable[dict], **match) -> dict | None:
    """The fastest fused row with these fields."""
    found = [r for r in rows if r["provider"] in FUSED and all(r.get(k) == v for k, v in match.items())]
    return min(found, key=lambda r: r["median_ms"]) if found else None


def _one(rows: Iterable[dict], provider: str, **match) -> dict | None:
    return next((r for r in rows if r["provider"] == provider and all(r.get(k) == v for k, v in match.items())), None)


def targets(kernels: list[dict], models: list[dict], graphs: list[dict]) -> list[tuple[str, str, float | None, str, bool | None]]:
    """(target, provider, measured, required, met) for every target the files can answer; measured is
    None (and met None) where the rows it needs are missing."""
    out = []
    kernels, models, graphs = ([r for r in rows if "error" not in r] for rows in (kernels, models, graphs))

    def add(what, row, value, need, ok):
        out.append((what, row["provider"] if row else "-", value if row else None, need, ok if row else None))

    for r in (r for r in kernels if r["suite"] == "ops" and r["dtype"] == "bfloat16" and r.get("layout") == "NHWC"):
        if r["provider"] in ("cuda", "triton"):
            add(f"ops {r['op']} {r['shape']}: % of copy bandwidth", r, r["pct_of_copy"], ">= 90", r["pct_of_copy"] >= 90)
    for r in (r for r in kernels if r["suite"] == "convs" and r["mode"] == "inference" and r["provider"] == "conv only"
              and r["dtype"] == "bfloat16"):
        fused = _best(kernels, suite="convs", mode="inference", case=r["case"], dtype="bfloat16", shape=r["shape"])
        ratio = fused["median_ms"] / r["median_ms"] if fused else None
        add(f"convs {r['case']} {r['shape']} eval: time / cuDNN conv alone", fused, ratio, "<= 1.05",
            ratio is not None and ratio <= 1.05)

    def model(mode, batch, rows=models):
        shape = f"{batch}x3x224x224"
        match = dict(suite="models", case="resnet50", shape=shape, dtype="bfloat16", mode=mode)
        return _best(rows, **match), {p: _one(models, p, **match) for p in ("eager", "compile-default", "compile-max-autotune")}

    fused, ref = model("inference", 256)
    for p, need in (("eager", 1.5), ("compile-max-autotune", 1.1)):
        v = ref[p]["median_ms"] / fused["median_ms"] if fused and ref[p] else None
        add(f"resnet50 inference b256: speedup vs {p}", fused if ref[p] else None, v, f">= {need}", v is not None and v >= need)
    fused, ref = model("training", 256)
    for p, need in (("eager", 1.3), ("compile-default", 1.1)):
        v = ref[p]["median_ms"] / fused["median_ms"] if fused and ref[p] else None
        add(f"resnet50 training b256: speedup vs {p}", fused if ref[p] else None, v, f">= {need}", v is not None and v >= need)
    mem = fused["peak_mem_mb"] / ref["eager"]["peak_mem_mb"] if fused and ref["eager"] and ref["eager"].get("peak_mem_mb") else None
    add("resnet50 training b256: peak memory / eager's", fused if mem is not None else None, mem, "<= 0.8",
        mem is not None and mem <= 0.8)
    fused, ref = model("inference", 1, graphs)
    v = ref["eager"]["median_ms"] / fused["median_ms"] if fused and ref["eager"] else None
    add("resnet50 inference b1: CUDA-graph fused vs eager", fused if ref["eager"] else None, v, ">= 2", v is not None and v >= 2)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels")
    p.add_argument("--models")
    p.add_argument("--graphs")
    args = p.parse_args(argv)
    rows = targets(_rows(args.kernels), _rows(args.models), _rows(args.graphs))
    width = max((len(r[0]) for r in rows), default=10)
    print(f"{'target':<{width}}  {'provider':<13} {'measured':>9}  {'required':<8} result")
    for what, provider, value, need, ok in rows:
        shown = "-" if value is None else f"{value:.3g}"
        verdict = "not measured" if ok is None else "met" if ok else "MISSED"
        print(f"{what:<{width}}  {provider:<13} {shown:>9}  {need:<8} {verdict}")


if __name__ == "__main__":
    main()
