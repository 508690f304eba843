"""The degradation problem (He et al. 2015, Fig. 6): plain vs residual CIFAR networks.

Trains four networks built by `resnet_fused.models.cifar_resnet` -- a shallow and a deep plain net
(no shortcuts) and their residual twins (option-A shortcuts, same initial weights) -- on the same
batches with the paper's recipe (SGD, momentum 0.9, weight decay 1e-4, batch 128, BN in train mode,
4-pixel random crops; lr 0.1, /10 at 50% and 75% of the iterations, after a warm-up at 0.01 until the
training error is below 80%), and plots the smoothed TRAINING error against iterations: plain nets
dashed, residual nets solid, one colour per depth. What the paper shows: the deeper plain net has the
higher training error (an optimization problem, not overfitting), while the deeper residual net
trains at least as well as the shallower one.

Data: by default scikit-learn's `load_digits` (1797 8x8 grey digits, shipped with the package),
upsampled bilinearly to 32x32 and repeated to 3 channels; depths 8/20 with --quick, 20/56 otherwise.
It is easy: every net ends at ~0% training error, so the effect shows in how fast each net gets
there. `--data PATH` uses a CIFAR-10 directory already on disk (torchvision's python-pickle batches,
no download; crops plus random flips), depths 20/56 and the paper's 64k iterations by default.

The committed plot examples/degradation_quick.png was made on 2 CPU cores with:
    PYTHONPATH=/work/main python examples/degradation.py --quick --out examples/degradation_quick.png
A CSV of the curves (iteration, net, error) is written next to the PNG.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from tqdm import tqdm

from resnet_fused.models import cifar_resnet

K = 20  # smoothing window (iterations) of the plotted training error


def load_digits_32(device):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    return x.to(device), torch.tensor(d.target).to(device)


def load_cifar10(root, device):
    from torchvision.datasets import CIFAR10

    ds = CIFAR10(root, train=True, download=False)
    x = torch.tensor(ds.data).permute(0, 3, 1, 2).float() / 255.0
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    return ((x - mean) / std).to(device), torch.tensor(ds.targets).to(device)


def augment(x, gen, flip=True):
    """The paper's augmentation: 4-pixel zero padding, a random 32x32 crop, a random horizontal flip."""
    n, c = x.shape[:2]
    dy, dx = torch.randint(0, 9, (2, n, 1), generator=gen).to(x.device) + torch.arange(32, device=x.device)
    x = F.pad(x, (4, 4, 4, 4))[torch.arange(n, device=x.device)[:, None, None, None],
                               torch.arange(c, device=x.device)[:, None, None], dy[:, None, :, None], dx[:, None, None, :]]
    if flip:
        x = torch.where((torch.rand(n, generator=gen) < 0.5).to(x.device)[:, None, None, None], x.flip(3), x)
    return x


def batches(n, batch, iters, seed):
    """The same sequence of shuffled mini-batch indices for every net."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.empty(0, dtype=torch.long)
    for _ in range(iters):
        if len(idx) < batch:
            idx = torch.cat([idx, torch.randperm(n, generator=gen)])
        yield idx[:batch]
        idx = idx[batch:]


def lr_at(it, iters, warming_up):
    """The paper's schedule: 0.1, divided by 10 at 50% and 75% of training; 0.01 while warming up."""
    return 0.01 if warming_up else 0.1 * 0.1 ** ((it >= iters // 2) + (it >= 3 * iters // 4))


def train(depth, plain, x, y, args):
    model = cifar_resnet(depth, 10, shortcut="A", plain=plain).to(args.device)
    fmt = torch.channels_last if args.device.startswith("cuda") else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed + 1)
    errors, name, warming_up = [], f"{'plain' if plain else 'ResNet'}-{depth}", True
    start = time.perf_counter()
    for it, idx in enumerate(tqdm(batches(len(x), 128, args.iters, args.seed), total=args.iters, desc=name)):
        for g in opt.param_groups:
            g["lr"] = lr_at(it, args.iters, warming_up)
        xb, yb = x[idx.to(x.device)], y[idx.to(y.device)]
        xb = augment(xb, gen, flip=bool(args.data))  # no mirrored digits
        out = model(xb.contiguous(memory_format=fmt))
        loss = F.cross_entropy(out, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        errors.append((out.argmax(1) != yb).float().mean())
        # warm-up as the paper's for ResNet-110: lr 0.01 until the training error is below 80% (without
        # it ResNet-56 blows up in the first few iterations on digits and stays at ~80% error)
        warming_up = warming_up and (it < K or torch.stack(errors[-K:]).mean().item() >= 0.8)
    return name, torch.stack(errors).cpu(), time.perf_counter() - start


def smooth(e, k):
    """Running mean over the last k iterations (fewer at the start)."""
    c = torch.cat([torch.zeros(1), e.cumsum(0)])
    i = torch.arange(1, len(e) + 1)
    return (c[i] - c[(i - k).clamp(min=0)]) / (i - (i - k).clamp(min=0))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="depths 8/20, 250 iterations: a few minutes on a CPU")
    p.add_argument("--data", help="CIFAR-10 directory (python-pickle batches); default: sklearn digits")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--iters", type=int, help="training iterations per net")
    p.add_argument("--out", default="degradation.png")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    depths = (8, 20) if args.quick else (20, 56)
    args.iters = args.iters or (250 if args.quick else 64000 if args.data else 2000)
    torch.backends.cudnn.benchmark = False
    x, y = load_cifar10(args.data, args.device) if args.data else load_digits_32(args.device)
    print(f"{len(x)} training images, depths {depths}, {args.iters} iterations, device {args.device}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colour = dict(zip(depths, ("tab:blue", "tab:red")))
    rows, table = [], []
    for plain in (True, False):
        for depth in depths:
            name, errors, secs = train(depth, plain, x, y, args)
            s = smooth(errors, K)
            ax.plot(range(1, len(s) + 1), 100 * s, ls="--" if plain else "-", color=colour[depth], label=name)
            rows += [(i + 1, name, f"{v:.4f}") for i, v in enumerate(s.tolist())]
            table.append(f"{name:<10} {depth:>5} {100 * s[-1]:>8.1f}% {100 * errors.mean():>8.1f}% {secs:>8.1f}")
    print(f"\n{'net':<10} {'depth':>5} {'final err':>9} {'mean err':>9} {'seconds':>8}", *table, sep="\n")
    ax.set(xlabel="iteration", ylabel=f"training error (%), mean of last {K} iterations", ylim=(0, None),
           title=f"Plain (dashed) vs residual (solid) on {'CIFAR-10' if args.data else 'sklearn digits, 32x32'}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        csv.writer(f).writerows([("iteration", "net", "error"), *rows])
    print(f"wrote {out} and {out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
