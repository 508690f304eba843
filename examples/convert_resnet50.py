"""Convert a torchvision resnet50 with resnet_fused.fuse_ and check that it computes the same thing.

    python examples/convert_resnet50.py [--device cuda] [--batch 8]

Prints the conversion report, the eval speed of both models, and how far each one's results are from
the same model run in float64 (eval outputs; training outputs, all gradients, running statistics
after one step), as a 2-norm relative error: the converted model should be as close as the original.
"""

import argparse
import copy
import time

import torch
import torchvision

import resnet_fused


def rel(a, exact) -> float:
    """|a - exact| / |exact| in the 2-norm, over a tensor or a list of tensors."""
    a, exact = (torch.cat([t.double().reshape(-1) for t in (v if isinstance(v, list) else [v])]) for v in (a, exact))
    return ((a - exact).norm() / exact.norm()).item()


def report(what: str, fused, original, exact) -> None:
    print(f"{what:<22} fused {rel(fused, exact):.2e}   original {rel(original, exact):.2e}   (relative to float64)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=224)
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)

    original = torchvision.models.resnet50().to(device, memory_format=torch.channels_last)  # random init: no download
    fused = resnet_fused.fuse_(copy.deepcopy(original))
    print(fused.resnet_fused_report)

    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device).contiguous(memory_format=torch.channels_last)
    exact = copy.deepcopy(original).double()
    models = (fused, original, exact)
    with torch.no_grad():
        for model in (original, fused):
            model.eval()(x)
            start = time.perf_counter()
            for _ in range(3):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            name = "fused" if model is fused else "original"
            print(f"eval time, {name:<9}  {(time.perf_counter() - start) / 3 * 1e3:.0f} ms per batch of {args.batch}")
        report("eval output:", *(m.eval()(x.to(next(m.parameters()).dtype)) for m in models))

    grad = torch.randn(args.batch, 1000, device=device)
    outs = []
    for m in models:
        dtype = next(m.parameters()).dtype
        out = m.train()(x.to(dtype))
        out.backward(grad.to(dtype))
        outs.append(out.detach())
    report("train output:", *outs)
    report("train gradients:", *([p.grad for p in m.parameters()] for m in models))
    report("train running stats:", *([b for b in m.buffers() if b.is_floating_point()] for m in models))


if __name__ == "__main__":
    main()
