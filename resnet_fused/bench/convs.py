"""The `convs` suite: every distinct conv -> BN (-> + residual) (-> ReLU) of torchvision's ResNet-50,
eager modules vs the fused call (and torch.compile where asked), in achieved TFLOP/s against a large
matmul measured in the same run (on the CPU in the same alternating rounds as each case, since the
machine's speed drifts), next to the time of the convolution alone (cuDNN / oneDNN).

FLOPs are the convolution's: 2 * N * Hout * Wout * Cout * Cin * KH * KW for a forward, three times
that for "training" (forward, input gradient, weight gradient); BN, add and ReLU are memory-bound
and not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from resnet_fused.bench.blocks import tuned_choice
from resnet_fused.bench.timing import copies_exceeding_l2, first_call_s, fresh_compile_cache, time_cpu_interleaved, time_cuda
from resnet_fused.nn.conv_bn import FusedConvBNReLU, conv_bn_forward
from resnet_fused.nn.fold import FoldCache


@dataclass(frozen=True)
class ConvShape:
    name: str  # where it sits in ResNet-50, e.g. "layer2.0.conv2"
    cin: int
    hw: int  # input height = width
    cout: int
    kernel: int
    stride: int = 1
    residual: bool = False  # the block's last conv: + shortcut before the ReLU
    relu: bool = True  # False for the projection shortcut

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.kernel) // self.stride + 1

    def flops(self, batch: int) -> int:
        return 2 * batch * self.out_hw**2 * self.cout * self.cin * self.kernel**2

    def label(self, batch: int) -> str:
        return f"{batch}x{self.cin}x{self.hw}x{self.hw}>{self.cout} k{self.kernel}s{self.stride}"


def _stage(layer: int, cin: int, width: int, hw: int, stride: int) -> list[ConvShape]:
    """The distinct convs of one ResNet-50 stage (v1.5: the stride sits on the 3x3 conv)."""
    out, first = 4 * width, f"layer{layer}.0"
    return [
        ConvShape(f"{first}.conv1", cin, hw, width, 1),
        ConvShape(f"{first}.conv2", width, hw, width, 3, stride),
        ConvShape(f"{first}.conv3", width, hw // stride, out, 1, residual=True),
        ConvShape(f"{first}.downsample", cin, hw, out, 1, stride, relu=False),
        ConvShape(f"layer{layer}.1.conv1", out, hw // stride, width, 1),
        *([ConvShape(f"layer{layer}.1.conv2", width, hw // stride, width, 3)] if stride > 1 else []),
    ]


RESNET50_CONVS = [
    ConvShape("stem", 3, 224, 64, 7, 2),
    *_stage(1, 64, 64, 56, 1),
    *_stage(2, 256, 128, 56, 2),
    *_stage(3, 512, 256, 28, 2),
    *_stage(4, 1024, 512, 14, 2),
]
MODES = ("inference", "training fwd", "training")  # eval no-grad; train-mode forward under autograd; forward + backward


def providers(device: torch.device, compile_modes: list[str]) -> list[str]:
    from resnet_fused.bench.blocks import providers as block_providers

    return ["conv only", *block_providers(device, compile_modes)]


def _modules(shape: ConvShape, device, dtype) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(0)
    conv = nn.Conv2d(shape.cin, shape.cout, shape.kernel, shape.stride, shape.padding, bias=False)
    bn = nn.BatchNorm2d(shape.cout)
    with torch.no_grad():  # running statistics away from (0, 1), so that folding is not trivial
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    return (conv.to(device, dtype, memory_format=torch.channels_last), bn.to(device, dtype))


def _forward(shape: ConvShape, provider: str, training: bool, device, dtype) -> Callable:
    """forward(x, residual) of `provider` on its own conv and BN modules (same initial values), in
    training or eval mode."""
    conv, bn = _modules(shape, device, dtype)
    conv.train(training), bn.train(training)
    if provider == "conv only":
        return lambda x, r: conv(x)
    if provider.startswith("fused-"):
        backend, cache = provider.removeprefix("fused-"), FoldCache()
        return lambda x, r: conv_bn_forward(conv, bn, x, r, shape.relu, backend=backend, cache=cache, name="conv")
    if provider == "tuned":
        layer = FusedConvBNReLU(shape.cin, shape.cout, shape.kernel, shape.stride, shape.padding, relu=shape.relu,
                                backend="tune").to(device, dtype, memory_format=torch.channels_last).train(training)
        layer.conv, layer.bn = conv, bn
        return layer

    def eager(x, r):
        y = bn(conv(x))
        y = y + r if r is not None else y
        return torch.relu(y) if shape.relu else y

    if provider.startswith("compile-"):
        mode = provider.removeprefix("compile-")
        return torch.compile(eager, mode=None if mode == "default" else mode)
    return eager


def _call(shape: ConvShape, forward: Callable, mode: str, batch: int, device, dtype) -> Callable[[], object]:
    """One timed call of `forward` in `mode`, on fresh random channels_last inputs."""
    x = torch.randn(batch, shape.cin, shape.hw, shape.hw, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(mode != "inference")
    out_shape = (batch, shape.cout, shape.out_hw, shape.out_hw)
    r = torch.randn(out_shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last) if shape.residual else None
    if mode == "inference":
        def infer():
            with torch.no_grad():
                return forward(x, r)
        return infer
    if mode == "training fwd":
        return lambda: forward(x, r)
    grad = torch.randn(out_shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)

    def train():
        forward(x, r).backward(grad)
        x.grad = None
    return train


def _matmul(dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], object], int]:
    """The compute ceiling's workload: one large square matmul in `dtype`, and its FLOPs."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return (lambda: a @ b), 2 * n**3


def run(shapes, batch: int, dtypes, modes, device: torch.device, compile_modes, quick: bool, rec) -> None:
    names = providers(device, compile_modes)
    matmuls, ceilings_ms = {}, {}  # per dtype: the ceiling's workload; on the GPU (steady clocks) its time
    for shape in shapes:  # shapes outermost: a run cut short has every dtype and mode of its first shapes
        for dtype in dtypes:
            nbytes = 2 * batch * shape.cin * shape.hw**2 * torch.finfo(dtype).bits // 8
            copies = copies_exceeding_l2(nbytes, device)
            for mode in modes:
                fields = dict(suite="convs", case=shape.name, shape=shape.label(batch), dtype=str(dtype).removeprefix("torch."),
                              mode=mode)
                with rec.case(fields, names) as c:
                    if dtype not in matmuls:
                        mm = _matmul(dtype, device)
                        mm[0]()  # warm-up
                        ceilings_ms[dtype] = time_cuda([mm[0]]).median_ms if device.type == "cuda" else None
                        matmuls[dtype] = mm
                    matmul, matmul_flops = matmuls[dtype]
                    fresh_compile_cache()
                    forwards = c.each(lambda p: _forward(shape, p, mode != "inference", device, dtype))
                    tuning_s = c.each(lambda p: first_call_s(_call(shape, forwards[p], mode, batch, device, dtype), device),
                                      among=["tuned"])
                    chosen = c.each(lambda p: tuned_choice(forwards[p]), among=list(tuning_s))
                    if device.type == "cuda":  # inputs rotated past L2
                        timings = c.each(lambda p: time_cuda([_call(shape, forwards[p], mode, batch, device, dtype)
                                                              for _ in range(copies)]))
                        ceiling_ms = ceilings_ms[dtype]
                    else:  # alternating rounds (see time_cpu_interleaved), the matmul ceiling in the same rounds
                        calls = c.each(lambda p: _call(shape, forwards[p], mode, batch, device, dtype))
                        c.each(lambda p: calls[p]())
                        timings = time_cpu_interleaved({**{p: calls[p] for p in c.live}, "matmul": matmul},
                                                       0.5 if quick else 2.0)
                        ceiling_ms = timings.pop("matmul").median_ms
                    ceiling = matmul_flops / ceiling_ms / 1e9
                    flops = shape.flops(batch) * (3 if mode == "training" else 1)  # + dgrad + wgrad
                    for p, t in timings.items():
                        tflops = flops / t.median_ms / 1e9
                        c.result(p, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs,
                                 flops=flops, tflops=tflops, matmul_tflops=ceiling, pct_of_matmul=100 * tflops / ceiling,
                                 **({"tuning_s": tuning_s[p], "tuned_choice": chosen.get(p)} if p in tuning_s else {}))


def count(shapes, dtypes, modes, device, compile_modes) -> int:
    return len(shapes) * len(dtypes) * len(modes) * len(providers(device, compile_modes))
