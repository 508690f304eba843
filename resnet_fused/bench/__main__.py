"""The main job: ``python -m resnet_fused.bench`` (or ``resnet-fused-bench``).

Measures the fused kernels, blocks and models against eager PyTorch (and torch.compile, with
--compile) on whatever machine it finds: a quick suite on a CPU, the ResNet shapes at batch 256 on a
GPU, and the host time per call at tiny sizes (overhead). Shows progress, writes each row to
rows.jsonl as it is measured (bench/rows.py), then prints a table and writes results.json, results.csv
and plots into --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os

import torch

from resnet_fused.bench import blocks, convs, coverage, environment, models, ops, overhead, plots, timing
from resnet_fused.bench import rows as rows_

# ResNet-50 stage inputs of the BN-add-ReLU at the end of each bottleneck: (C, H, W)
RESNET50_STAGES = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SUITES = ("ops", "convs", "blocks", "models", "overhead", "coverage")  # coverage: only when asked for (--suite coverage)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m resnet_fused.bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=SUITES, action="append", help="repeatable, run in the order given; default: all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), action="append", help="repeatable; default: fp32 on CPU, bf16 and fp16 on GPU")
    p.add_argument("--batch", type=int, action="append", help="repeatable; default: CPU 32 (ops) / 8 (blocks, models); GPU 256, models 1, 32, 256")
    p.add_argument("--compile", choices=["default", "max-autotune"], action="append",
                   help="time torch.compile of the eager module in this mode (repeatable; default: default)")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it compiles every case: minutes)")
    p.add_argument("--known-compile", metavar="DIR",
                   help="reuse the torch.compile rows of the eager modules that the results.json / rows.jsonl files "
                        "under DIR hold from this device, torch and triton, instead of compiling those cases again")
    p.add_argument("--quick", action="store_true", help="the first stage shapes only, short timings")
    p.add_argument("--conv-mode", choices=convs.MODES, action="append",
                   help="the convs suite's modes (repeatable; default: all, inference with --quick)")
    p.add_argument("--cuda-graphs", action="store_true", help="GPU: time every call as a CUDA graph replay")
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="start no case later than SECONDS after measuring begins; then write what was measured and exit 0")
    p.add_argument("--out", default="bench-results", help="directory for results.json, results.csv and the plots")
    p.add_argument("--rows", metavar="PATH", help="where each row is written as it is measured (default: OUT/rows.jsonl)")
    p.add_argument("--from-rows", metavar="PATH",
                   help="measure nothing: write results.json, results.csv and the plots into --out from a rows.jsonl")
    return p.parse_args(argv)


def main(argv=None) -> None:
    from tqdm import tqdm

    args = parse_args(argv)
    if args.from_rows:
        env, rows, end = rows_.read(args.from_rows)
        write_results(rows, env, args.out, None if end == "complete" else end or "killed")
        return
    # users compare against torch.compile first; CUDA graph replays leave it out unless asked for (and then refuse)
    args.compile = [] if args.no_compile or (args.cuda_graphs and not args.compile) else (args.compile or ["default"])
    # the "tuned" provider tunes afresh in every run (its tuning time is reported), unless told otherwise
    os.environ.setdefault("RESNET_FUSED_TUNING_CACHE", "off")
    if args.cuda_graphs and args.compile:
        raise SystemExit("--cuda-graphs with --compile: torch.compile makes its own CUDA graphs (mode='max-autotune'), "
                         "which cannot be captured inside ours; run them separately")
    device = torch.device(args.device)
    timing.use_cuda_graphs(args.cuda_graphs and device.type == "cuda")
    gpu = device.type == "cuda"
    suites = args.suite or [s for s in SUITES if s != "coverage"]
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16", "fp16"] if gpu else ["fp32"]))]
    few = args.quick or not gpu
    plan = {}
    if "ops" in suites:
        batches = args.batch or [256 if gpu else 32]
        plan["ops"] = dict(shapes=[(b, c, h, w) for b in batches for c, h, w in RESNET50_STAGES[: 1 if few else 4]])
    if "convs" in suites:  # quick: the stem and layer1's convs, inference only
        plan["convs"] = dict(shapes=convs.RESNET50_CONVS[:6] if args.quick else convs.RESNET50_CONVS,
                             batch=(args.batch or [256 if gpu else 8])[0],
                             modes=args.conv_mode or (convs.MODES[:1] if args.quick else convs.MODES))
    if "blocks" in suites:
        stages = [blocks.RESNET18_STAGES[0], blocks.RESNET50_STAGES[0]] if few else blocks.RESNET18_STAGES + blocks.RESNET50_STAGES
        plan["blocks"] = dict(stages=stages, batch=(args.batch or [256 if gpu else 8])[0])
    if "models" in suites:
        plan["models"] = dict(names=["resnet18"] if args.quick else ["resnet18", "resnet50"],
                              batches=args.batch or ([1, 32, 256] if gpu and not args.quick else [8]),
                              resolution=112 if args.quick else 224)
    if "overhead" in suites:
        plan["overhead"] = dict(cases=list(overhead.CASES))
    total = sum([
        ops.count(plan["ops"]["shapes"], dtypes, device) if "ops" in plan else 0,
        convs.count(plan["convs"]["shapes"], dtypes, plan["convs"]["modes"], device, args.compile) if "convs" in plan else 0,
        blocks.count(plan["blocks"]["stages"], dtypes, device, args.compile) if "blocks" in plan else 0,
        models.count(plan["models"]["names"], plan["models"]["batches"], dtypes, device, args.compile) if "models" in plan else 0,
        overhead.count(plan["overhead"]["cases"], dtypes, device, args.compile, args.quick) if "overhead" in plan else 0,
        coverage.count(args.quick) if "coverage" in suites else 0,
    ])

    env = environment.describe(device)
    print(f"resnet_fused bench on {env['device']}: torch {env['torch']}, triton {env['triton']}; "
          f"suites {', '.join(dict.fromkeys(suites))}" + (f"; deadline {args.deadline:g} s" if args.deadline is not None else ""))
    known = rows_.measured_compile(args.known_compile, env) if args.known_compile and args.compile else {}
    with tqdm(total=total, unit="case") as bar:
        rec = rows_.Recorder(args.rows or os.path.join(args.out, "rows.jsonl"), env, args.deadline, bar.update,
                             known) if plan else None
        try:
            for suite in dict.fromkeys(suites):
                p = plan.get(suite)
                if suite == "ops":
                    ops.run(p["shapes"], dtypes, device, args.quick, rec)
                elif suite == "convs":
                    convs.run(p["shapes"], p["batch"], dtypes, p["modes"], device, args.compile, args.quick, rec)
                elif suite == "blocks":
                    blocks.run(p["stages"], p["batch"], dtypes, device, args.compile, args.quick, rec)
                elif suite == "models":
                    models.run(p["names"], p["batches"], p["resolution"], dtypes, device, args.compile, args.quick, rec)
                elif suite == "overhead":
                    overhead.run(p["cases"], dtypes, device, args.compile, args.quick, rec)
                else:  # coverage (CPU, fp32): its own table and files (coverage.json / .csv / .png)
                    cov_rows, cov_summary = coverage.run(args.quick, progress=bar.update)
                    cov_written = coverage.write(cov_rows, cov_summary, env, args.out)
                    print(coverage.format_table(cov_rows, cov_summary))
                    print("\nwrote " + ", ".join(cov_written))
            stopped = None
        except rows_.DeadlineReached:
            stopped = "deadline"
    if rec is None:
        return
    rec.close(stopped or "complete")
    write_results(rec.rows, env, args.out, stopped)
    if stopped:
        print(f"stopped at the deadline ({args.deadline:g} s): {len(rec.rows)} of {total} rows measured, "
              "no further case started")


def write_results(rows: list[dict], env: dict, out: str, stopped: str | None = None) -> None:
    """results.json, results.csv and the plots in `out`, and the table; stopped: why the rows end early
    ("deadline", "killed"), recorded in results.json."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"environment": env, "results": rows, **({"stopped": stopped} if stopped else {})}, f, indent=1)
    fields = ["device", *dict.fromkeys(k for r in rows for k in r)]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({"device": env["device"], **r} for r in rows)
    written = plots.speedup_plots(rows, env, out)
    print(format_table(rows))
    print(f"\nwrote {out}/results.json, {out}/results.csv" + "".join(f", {p}" for p in written))


def format_table(rows) -> str:
    """One line per measurement: what, how long (median, 20-80 % range), the achieved rate (overhead: host
    microseconds per call and dispatched ops per step), vs eager; a provider that failed shows its error,
    a row reused from an earlier run (--known-compile) ends in "*", a tuned row names what the tuner chose."""
    head = f"{'suite':<8} {'case':<19} {'shape':<24} {'dtype':<8} {'mode':<12} {'provider':<15} {'median ms':>10} {'rate':>18} {'vs eager':>9}"
    lines = ["", head, "-" * len(head)]
    for r in rows:
        mode = r.get("mode") or r.get("layout", "")
        case = r.get("case") or r.get("op")
        what = f"{r['suite']:<8} {case:<19} {r['shape']:<24} {r['dtype']:<8} {mode:<12} {r['provider']:<15} "
        if "error" in r:
            lines.append(what + f"failed: {r['error'][:120]}")
            continue
        if "gbps" in r:
            rate = f"{r['gbps']:.1f} GB/s {r['pct_of_copy']:.0f}%"
        elif "tflops" in r:
            rate = f"{r['tflops']:.2f} TF/s {r['pct_of_matmul']:.0f}%"
        elif "host_us" in r:
            rate = f"{r['host_us']:.0f} us, {r['aten_ops']} ops"
        elif "images_per_s" in r:
            rate = f"{r['images_per_s']:.1f} img/s"
        else:
            rate = ""
        speedup = "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
        chose = f"  ({r['tuned_choice'][:80]})" if r.get("tuned_choice") else ""
        lines.append(what + f"{r['median_ms']:>10.3f} {rate:>18} {speedup:>9}" + (" *" if "from" in r else "") + chose)
    if any("from" in r for r in rows):
        lines.append("* reused from an earlier run with the same device, torch and triton (its \"from\" field)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
