"""The coverage suite: ``python -m resnet_fused.bench --suite coverage``.

For a list of torchvision, timm and Hugging Face transformers CNNs (random weights, pretrained=False; BN
parameters and running statistics randomized so that eval mode tests something): how many BatchNorm
layers `fuse_` fuses (and how many the rules before issue 19, ReLU only, fused: BEFORE_ISSUE_19), which
are left and why, how long the conversion takes, and whether the fused model still computes what the
original did, in eval and in training mode. Each output is compared, in the 2-norm, with a float64 twin
of the original: the fused model's relative error is set against the original fp32 model's own (a
single ReLU flip hits both alike, so a norm, not a max, is the fair measure). Targets: at most about 2x
the original's error; a mean share of BN layers fused of at least 98 % over all models.

Writes coverage.json, coverage.csv and coverage.png into --out and prints a table.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import statistics
import time
from collections import Counter

import torch
from torch import nn

import resnet_fused
from resnet_fused.nn.norms import is_frozen_bn

# (label, source, builder name, ResNet family?)
TORCHVISION = [
    ("resnet18", True), ("resnet50", True), ("resnext50_32x4d", True), ("wide_resnet50_2", True),
    ("regnet_y_400mf", False), ("fcn_resnet50.backbone", True), ("fasterrcnn_resnet50_fpn.backbone", True),
    ("mobilenet_v3_small", False),
]
TIMM = [
    ("resnet18", True), ("resnet50d", True), ("resnext26ts", True), ("seresnet50", True), ("ecaresnet26t", True),
    ("skresnet18", True), ("resnetblur18", True), ("resnetrs50", True), ("resnetv2_50", True),
    ("regnety_008", False), ("cspresnet50", True), ("wide_resnet50_2", True),
]
TRANSFORMERS = [("resnet50", True)]  # ResNetForImageClassification with ResNetConfig()'s defaults: the resnet-50 layout
QUICK = {("torchvision", "resnet18"), ("torchvision", "regnet_y_400mf"), ("torchvision", "fasterrcnn_resnet50_fpn.backbone"),
         ("timm", "resnext26ts"), ("timm", "resnetv2_50"), ("timm", "regnety_008")}
ERROR_RATIO_TARGET = 2.0
MEAN_FUSED_PCT_TARGET = 98.0
RESNET152_TARGET_S = 1.0

# % of BN layers fused before issue 19 (fuse_ at ed06f1f, dry run: conv -> BN -> ReLU / none only), with why the
# rest were left; models not listed were at 100 %
BEFORE_ISSUE_19 = {
    ("torchvision", "mobilenet_v3_small"): (47.1, "18x followed by Hardswish"),
    ("timm", "resnext26ts"): (38.7, "19x BatchNormAct2d with activation SiLU"),
    ("timm", "resnetv2_50"): (65.3, "16x pre-activation norm1 (BatchNormAct2d + ReLU after a residual sum); 1x final norm"),
    ("timm", "cspresnet50"): (30.9, "38x BatchNormAct2d with activation LeakyReLU"),
    ("transformers", "resnet50"): (0.0, "53x ResNetConvLayer / ResNetShortCut not recognized"),
}


def build(source: str, name: str) -> nn.Module:
    if source == "transformers":
        import transformers

        return transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=10))
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)
    import torchvision

    if name == "fcn_resnet50.backbone":
        return torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=10).backbone
    if name == "fasterrcnn_resnet50_fpn.backbone":  # as with pretrained weights: FrozenBatchNorm2d, 3 trainable stages
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
        from torchvision.ops import FrozenBatchNorm2d

        return resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    return getattr(torchvision.models, name)(num_classes=10)


def randomize_norms(model: nn.Module, gain=(0.2, 0.6)) -> nn.Module:
    """Non-default BN weights and statistics (frozen BNs too), with a small gain: deep nets keep their scale."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or is_frozen_bn(m):
                if m.weight is not None:
                    m.weight.uniform_(*gain)
                    m.bias.uniform_(-0.3, 0.3)
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.3, 0.3)
                    m.running_var.uniform_(0.5, 1.5)
    return model


def _flat(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.reshape(-1).double()
    if isinstance(out, dict):  # a backbone's feature maps; a transformers ModelOutput (its fields that are set)
        out = list(out.values())
    return torch.cat([_flat(o) for o in out])


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))


def _errors(original, fused, twin, x, training: bool) -> tuple[float, float]:
    """(original's, fused model's) relative 2-norm distance from the float64 twin, one forward in this mode
    (each on a copy in training, so that running statistics of the next measurement stay put)."""
    outs = []
    for m, inp in ((original, x), (fused, x), (twin, x.double())):
        m = copy.deepcopy(m) if training else m
        m.train(training)
        with torch.no_grad():
            outs.append(_flat(m(inp)))
    return _rel(outs[0], outs[2]), _rel(outs[1], outs[2])


def _summary(reasons: dict[str, str]) -> str:
    """The most common reasons a BN was left, shortened (the full list is in the JSON)."""
    counts = Counter(r.split(" (")[0].split(":")[0][:60] for r in reasons.values())
    return "; ".join(f"{n}x {r}" for r, n in counts.most_common(3))


def measure(source: str, name: str, resnet_family: bool, batch: int = 2, resolution: int = 64) -> dict:
    torch.manual_seed(0)
    original = randomize_norms(build(source, name)).eval()
    twin = copy.deepcopy(original).double()
    fused = copy.deepcopy(original)
    t0 = time.perf_counter()
    resnet_fused.fuse_(fused)
    convert_s = time.perf_counter() - t0
    report = fused.resnet_fused_report
    x = torch.randn(batch, 3, resolution, resolution)
    eval_orig, eval_fused = _errors(original, fused, twin, x, training=False)
    train_orig, train_fused = _errors(original, fused, twin, x, training=True)
    resnet_fused.unfuse_(fused)
    restored = all(type(a) is type(b) for a, b in zip(fused.modules(), original.modules()))
    floor = 1e-7  # below this both are exact: compare against the floor
    return dict(
        suite="coverage", source=source, model=name, resnet_family=resnet_family,
        bn_layers=report.bn_total, bn_fused=len(report.bn_fused), fused_pct=round(100 * report.bn_fused_fraction, 1),
        fused_pct_before=BEFORE_ISSUE_19.get((source, name), (100.0, ""))[0],
        modules_swapped=len(report.swapped), convert_ms=round(1e3 * convert_s, 2),
        eval_err_original=eval_orig, eval_err_fused=eval_fused,
        eval_ratio=round(max(eval_fused, floor) / max(eval_orig, floor), 3),
        train_err_original=train_orig, train_err_fused=train_fused,
        train_ratio=round(max(train_fused, floor) / max(train_orig, floor), 3),
        unfuse_restores=restored, left_summary=_summary(report.bn_left), bn_left=report.bn_left,
        input=f"{batch}x3x{resolution}x{resolution}",
    )


def resnet152_conversion_s(repeats: int = 5) -> float:
    """Median seconds of fuse_ on a torchvision resnet152 (a fresh copy each time)."""
    import torchvision

    base = torchvision.models.resnet152()
    times = []
    for _ in range(repeats):
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        resnet_fused.fuse_(m)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def models(quick: bool = False) -> list[tuple[str, str, bool]]:
    every = ([("torchvision", n, f) for n, f in TORCHVISION] + [("timm", n, f) for n, f in TIMM]
             + [("transformers", n, f) for n, f in TRANSFORMERS])
    return [m for m in every if not quick or m[:2] in QUICK]


def count(quick: bool = False) -> int:
    return len(models(quick)) + 1


def run(quick: bool = False, progress=lambda n: None) -> tuple[list[dict], dict]:
    rows = []
    for source, name, family in models(quick):
        rows.append(measure(source, name, family))
        progress(1)
    summary = {"resnet152_convert_s": resnet152_conversion_s(3 if quick else 5)}
    progress(1)
    summary.update(targets(rows, summary["resnet152_convert_s"]))
    return rows, summary


def targets(rows: list[dict], resnet152_s: float) -> dict:
    family = [r for r in rows if r["resnet_family"]]
    full = [r for r in rows if r["source"] == "torchvision" and r["resnet_family"]]
    worst = max(max(r["eval_ratio"], r["train_ratio"]) for r in rows)
    mean = round(statistics.mean(r["fused_pct"] for r in rows), 1)
    return {
        "mean_fused_pct": mean,
        "mean_fused_pct_before": round(statistics.mean(r["fused_pct_before"] for r in rows), 1),
        "mean_fused_target_met": mean >= MEAN_FUSED_PCT_TARGET,
        "resnet_family_mean_fused_pct": round(statistics.mean(r["fused_pct"] for r in family), 1) if family else None,
        "torchvision_resnets_all_100pct": all(r["fused_pct"] == 100 for r in full),
        "worst_error_ratio": worst,
        "error_ratio_target_met": worst <= ERROR_RATIO_TARGET,
        "resnet152_convert_target_met": resnet152_s < RESNET152_TARGET_S,
        "all_unfuse_restore": all(r["unfuse_restores"] for r in rows),
    }


def format_table(rows: list[dict], summary: dict) -> str:
    head = (f"{'source':<12} {'model':<34} {'BN':>4} {'fused':>6} {'%':>6} {'before':>6} {'eval err orig':>14} {'fused':>9} "
            f"{'x':>5} {'train err orig':>15} {'fused':>9} {'x':>5} {'convert ms':>11}  left (most common reasons)")
    lines = ["", head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['source']:<12} {r['model']:<34} {r['bn_layers']:>4} {r['bn_fused']:>6} {r['fused_pct']:>6.1f} "
            f"{r['fused_pct_before']:>6.1f} "
            f"{r['eval_err_original']:>14.2e} {r['eval_err_fused']:>9.2e} {r['eval_ratio']:>5.2f} "
            f"{r['train_err_original']:>15.2e} {r['train_err_fused']:>9.2e} {r['train_ratio']:>5.2f} "
            f"{r['convert_ms']:>11.1f}  {r['left_summary']}")
    before = "; ".join(f"{source} {name} {pct} %: {why}" for (source, name), (pct, why) in BEFORE_ISSUE_19.items()
                       if any((r["source"], r["model"]) == (source, name) for r in rows))
    lines += ["", f"mean share of BN layers fused: {summary['mean_fused_pct']} % (target >= {MEAN_FUSED_PCT_TARGET:.0f}; "
                  f"before issue 19: {summary['mean_fused_pct_before']} %)",
              f"left before issue 19: {before or 'none of these models'}",
              f"ResNet-family mean share of BN layers fused: {summary['resnet_family_mean_fused_pct']} % (target >= 90)",
              f"torchvision ResNet / ResNeXt / Wide-ResNet and backbones at 100 %: {summary['torchvision_resnets_all_100pct']}",
              f"worst error ratio (fused / original, vs float64): {summary['worst_error_ratio']:.2f} (target <= {ERROR_RATIO_TARGET})",
              f"fuse_(torchvision resnet152): {summary['resnet152_convert_s'] * 1e3:.1f} ms (target < {RESNET152_TARGET_S * 1e3:.0f} ms)",
              f"unfuse_ restores every class: {summary['all_unfuse_restore']}"]
    return "\n".join(lines)


def write(rows: list[dict], summary: dict, env: dict, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f) for f in ("coverage.json", "coverage.csv")]
    with open(paths[0], "w") as f:
        json.dump({"environment": env, "summary": summary, "results": rows}, f, indent=1)
    fields = [k for k in rows[0] if k != "bn_left"]
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", *fields], extrasaction="ignore")
        w.writeheader()
        w.writerows({"device": env.get("device"), **r} for r in rows)
    png = plot(rows, out_dir)
    return paths + ([png] if png else [])


def plot(rows: list[dict], out_dir: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [f"{r['source'][:2]}:{r['model'].replace('.backbone', '.bb')}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8.0, 0.5 * len(rows) + 2), 7), sharex=True)
    xs = range(len(rows))
    ax1.bar(xs, [r["fused_pct"] for r in rows], color=["tab:blue" if r["resnet_family"] else "tab:gray" for r in rows])
    ax1.plot(xs, [r["fused_pct_before"] for r in rows], "k_", ms=14, label="before issue 19")
    ax1.axhline(MEAN_FUSED_PCT_TARGET, color="tab:red", lw=0.8, ls="--")
    ax1.set_ylabel("BN layers fused (%)")
    ax1.set_title(f"fuse_ coverage (blue: ResNet family; dashed: the {MEAN_FUSED_PCT_TARGET:.0f} % mean target)")
    ax1.legend(loc="lower left")
    ax2.plot(xs, [r["eval_ratio"] for r in rows], "o", label="eval")
    ax2.plot(xs, [r["train_ratio"] for r in rows], "x", label="training")
    ax2.axhline(ERROR_RATIO_TARGET, color="tab:red", lw=0.8, ls="--")
    ax2.set_ylabel("error vs float64:\nfused / original")
    ax2.legend()
    ax2.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "coverage.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
