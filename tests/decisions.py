"""Decisions within rounding: where an fp32 and a float64 run of the same network may take different
branches, and inputs chosen so that none does.

A ReLU's gradient mask, a max-pool's argmax, a LeakyReLU's slope are decisions: discontinuous in the
values they are taken on. Where the float64 value sits within the fp32 run's rounding of the threshold,
the two runs may branch apart, and one flipped ReLU sign changes a gradient by a whole element's worth:
measured on resnet26d (fp32, AVX2), a single flip in the last block took eager's error on the gradient
of that block's input from 7e-8 to 2e-3 of its norm, and the layers below carried it to the input. Such
a flip hits eager and fused alike, at random places: an error bound between them is then a coin toss
that depends on the machine's kernels. A comparison is sound where no decision is within reach of
rounding; `clear_input` finds such an input (or fails saying why) and the comparison runs on it.

How near is near: the spread (rms) of eager fp32's own error on the decided values, measured against
float64 at the same op, times CLEARANCE: the fused kernels' error on one value is taken to be within
that (a kernel less accurate than that fails the comparison it would then make, which is right).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from resnet_fused._layout import memory_format

aten = torch.ops.aten
CLEARANCE = 8.0
ATTEMPTS = 8


def _kinks(op, args) -> tuple[float, ...] | None:
    """The thresholds at which op's derivative jumps (None: op decides nothing elementwise)."""
    if op in (aten.relu.default, aten.relu_.default, aten.leaky_relu.default, aten.leaky_relu_.default):
        return (0.0,)
    if op in (aten.threshold.default, aten.threshold_.default, aten.clamp_min.default, aten.clamp_min_.default):
        return (float(args[1]),)
    if op in (aten.hardtanh.default, aten.hardtanh_.default):
        return (float(args[1]) if len(args) > 1 else -1.0, float(args[2]) if len(args) > 2 else 1.0)
    if op in (aten.hardswish.default, aten.hardswish_.default, aten.hardsigmoid.default, aten.hardsigmoid_.default):
        return (-3.0, 3.0)
    return None


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _pool_args(args):
    x, kernel = args[0], args[1]
    stride = args[2] if len(args) > 2 and args[2] else kernel
    padding = args[3] if len(args) > 3 else 0
    dilation = args[4] if len(args) > 4 else 1
    ceil_mode = args[5] if len(args) > 5 else False
    if ceil_mode:
        raise NotImplementedError("decisions: max-pool with ceil_mode=True has no clearance rule here")
    return x, kernel, stride, padding, dilation


def _top2_gap(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """max - second max of every max-pool window of x (N, C, H, W): how far its argmax is from a tie."""
    ph, pw = _pair(padding)
    padded = F.pad(x, (pw, pw, ph, ph), value=float("-inf"))
    n, c = x.shape[:2]
    windows = F.unfold(padded.reshape(n * c, 1, *padded.shape[2:]), _pair(kernel), dilation=_pair(dilation),
                       stride=_pair(stride))  # (N*C, kh*kw, L)
    top = windows.topk(2, dim=1).values
    return (top[:, 0] - top[:, 1]).nan_to_num(posinf=float("inf"))


class _Recorder(TorchDispatchMode):
    """Every decision's input in the order the ops run: (kind, tensor, thresholds or pool arguments)."""

    def __init__(self):
        super().__init__()
        self.decisions: list[tuple[str, torch.Tensor, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kinks = _kinks(func, args)
        if kinks is not None:
            self.decisions.append(("kink", args[0].detach().clone(), kinks))  # before an in-place op writes it
        elif func in (aten.max_pool2d_with_indices.default, aten.max_pool2d.default):
            x, *pool = _pool_args(args)
            self.decisions.append(("pool", x.detach().clone(), tuple(pool)))
        return func(*args, **kwargs)


def record(model: torch.nn.Module, x: torch.Tensor, training: bool) -> list:
    """The decisions a forward of a copy of model takes on x (the model's buffers do not move)."""
    model = copy.deepcopy(model).train(training)
    with torch.no_grad(), _Recorder() as rec:
        model(x)
    return rec.decisions


def nearest_call(eager_decisions: list, exact_decisions: list) -> tuple[float, str]:
    """min over all decisions of (distance of the float64 value from its threshold or tie) / (eager's
    own error on that value x CLEARANCE): below 1, rounding may flip it. With where it is."""
    if len(eager_decisions) != len(exact_decisions):
        raise AssertionError(f"decisions: eager took {len(eager_decisions)}, float64 {len(exact_decisions)}")
    worst, where = float("inf"), "no decision"
    for k, ((kind, v32, arg), (_, v64, _)) in enumerate(zip(eager_decisions, exact_decisions)):
        err = (v32.double() - v64).pow(2).mean().sqrt().item()  # rms: the spread of one element's error
        floor = torch.finfo(v32.dtype).eps * v64.abs().mean().item()  # eager exact there: still its resolution
        reach = CLEARANCE * max(err, floor)
        if kind == "kink":
            distance = min((v64 - t).abs().min().item() for t in arg)
        else:
            distance = _top2_gap(v64, *arg).min().item()
        if reach and distance / reach < worst:
            worst, where = distance / reach, f"decision {k} ({kind}): {distance:.3g} from its threshold, reach {reach:.3g}"
    return worst, where


def clear_input(eager: torch.nn.Module, exact: torch.nn.Module, x: torch.Tensor, training: bool,
                what: str = "") -> torch.Tensor:
    """x, or x nudged (1 % of its spread, fresh noise per attempt), such that every decision of the
    eager and float64 forwards is further than CLEARANCE x eager's rounding from its threshold."""
    spread = x.double().std().item() if x.numel() > 1 else 1.0
    candidate = x
    for attempt in range(ATTEMPTS):
        clearance, where = nearest_call(record(eager, candidate, training), record(exact, candidate.double(), training))
        if clearance > 1.0:
            return candidate
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(attempt), dtype=torch.float64)
        candidate = (x.double() + 0.01 * spread * noise).to(x.dtype).contiguous(memory_format=memory_format(x))
    raise AssertionError(f"{what}: no input within {ATTEMPTS} attempts keeps every decision clear of rounding "
                         f"(last: {where}); make the input smaller")
