"""The main job: ``python -m resnet_fused.bench`` (or ``resnet-fused-bench``).

Measures the fused ops against eager PyTorch on whatever machine it finds (CPU: a quick suite; GPU:
ResNet-50 stage shapes at batch 256), prints a table, and writes JSON and CSV into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os

import torch

from resnet_fused.bench import environment, ops

# ResNet-50 stage inputs of the BN-add-ReLU at the end of each bottleneck: (C, H, W)
RESNET50_STAGES = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m resnet_fused.bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=["ops"], default="ops", help="what to measure (blocks and models: to come)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), action="append", help="repeatable; default: fp32 on CPU, bf16 and fp16 on GPU")
    p.add_argument("--batch", type=int, help="batch size (default: 32 on CPU, 256 on GPU)")
    p.add_argument("--quick", action="store_true", help="one shape, short timings")
    p.add_argument("--out", default="bench-results", help="directory for results.json and results.csv")
    return p.parse_args(argv)


def main(argv=None) -> None:
    from tqdm import tqdm

    args = parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16", "fp16"] if on_gpu else ["fp32"]))]
    batch = args.batch or (256 if on_gpu else 32)
    stages = RESNET50_STAGES[:1] if args.quick or not on_gpu else RESNET50_STAGES
    shapes = [(batch, c, h, w) for c, h, w in stages]

    env = environment.describe(device)
    print(f"resnet_fused bench on {env['device']}: torch {env['torch']}, triton {env['triton']}")
    with tqdm(total=ops.count(shapes, dtypes, device), desc=args.suite, unit="case") as bar:
        rows = ops.run(shapes, dtypes, device, args.quick, progress=bar.update)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=1)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["device", *rows[0].keys()])
        writer.writeheader()
        writer.writerows({"device": env["device"], **r} for r in rows)
    print_table(rows)
    print(f"\nwrote {args.out}/results.json and {args.out}/results.csv")


def print_table(rows) -> None:
    head = f"{'op':<17} {'shape':<15} {'dtype':<8} {'layout':<6} {'provider':<8} {'median ms':>10} {'GB/s':>8} {'% copy':>7} {'vs eager':>9}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['op']:<17} {r['shape']:<15} {r['dtype']:<8} {r['layout']:<6} {r['provider']:<8} "
              f"{r['median_ms']:>10.3f} {r['gbps']:>8.1f} {r['pct_of_copy']:>6.0f}% {r['speedup_vs_eager']:>8.2f}x")


if __name__ == "__main__":
    main()
