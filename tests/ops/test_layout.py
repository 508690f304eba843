"""One layout rule: every kernel op's outputs have the same strides from the C++ CPU kernels as from
their fakes (meta tensors and FakeTensorMode), whatever the strides of the inputs.

The rule (csrc/checks.h layout_of, resnet_fused/_layout.py memory_format): channels_last when an
activation is dense channels_last and not also dense NCHW, else NCHW-contiguous.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import CL, backend_params, device_of, needs_extension

OPS = torch.ops.resnet_fused

# activation factories, one per stride pattern; each call gives a new tensor with those strides
LAYOUTS = {
    "nchw": lambda: torch.randn(2, 3, 4, 5),
    "channels_last": lambda: torch.randn(2, 3, 4, 5).contiguous(memory_format=CL),
    "nchw_non_dense": lambda: torch.randn(2, 3, 4, 10)[..., ::2],
    # channels_last order (C fastest, then W, H, N) but every other channel: strides (120, 2, 30, 6)
    "channels_last_non_dense": lambda: torch.randn(2, 4, 5, 6).permute(0, 3, 1, 2)[:, ::2],
    "channels_last_offset": lambda: torch.randn(3, 3, 4, 5).contiguous(memory_format=CL)[1:],
    "broadcast_w": lambda: torch.randn(2, 3, 4, 1).expand(2, 3, 4, 5),
    # dense in both layouts (C = 1, H = W = 1), with NCHW strides or with channels_last strides (made by
    # permuting an NHWC tensor: .contiguous(memory_format=CL) keeps them NCHW, they already count as both)
    "c1_nchw": lambda: torch.randn(2, 1, 4, 5),
    "c1_channels_last": lambda: _nhwc(2, 1, 4, 5),
    "hw1_nchw": lambda: torch.randn(2, 3, 1, 1),
    "hw1_channels_last": lambda: _nhwc(2, 3, 1, 1),
    "n1c1_channels_last": lambda: _nhwc(1, 1, 4, 5),
}


def _nhwc(N, C, H, W):
    return torch.randn(N, H, W, C).permute(0, 3, 1, 2)


def _calls(act):
    """(name, args) for every kernel op (the op: the name up to any "("), its activations made by `act`."""
    C = act().shape[1]

    def vec():
        return torch.rand(C) + 0.5

    return [
        ("add_relu_forward", (act(), act())),
        ("bn_stats", (act(),)),
        ("bn_act_apply", (act(), vec(), vec(), None, "relu", 0.0)),
        ("bn_act_apply(residual)", (act(), vec(), vec(), act(), "relu", 0.0)),
        ("act_backward", (act(), act(), vec(), vec(), act(), "silu", 0.0)),
        ("bn_act_backward_reduce", (act(), act(), vec(), act())),
        ("bn_act_backward_elemt(train)", (act(), act(), act(), vec(), vec(), vec(), vec(), True)),
        ("bn_act_backward_elemt(eval)", (act(), act(), None, None, vec(), None, None, True)),
    ]


def _on_meta(t):
    # the same sizes, strides and storage offset on the meta device (Tensor.to would re-stride a non-dense one)
    if not isinstance(t, torch.Tensor):
        return t
    storage = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype, device="meta")
    return storage.as_strided(t.size(), t.stride(), t.storage_offset())


def _signature(out):
    outs = out if isinstance(out, tuple) else (out,)
    return [(tuple(o.shape), o.stride(), o.dtype) for o in outs]


@needs_extension
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fake_and_real_outputs_have_the_same_strides(layout):
    for name, args in _calls(LAYOUTS[layout]):
        op = getattr(OPS, name.split("(")[0])
        real = _signature(op(*args))
        meta = _signature(op(*[_on_meta(a) for a in args]))
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = _signature(op(*fake_args))
        strides = [a.stride() for a in args if isinstance(a, torch.Tensor)]
        assert meta == real, f"{name} on inputs with strides {strides}: meta {meta} != CPU {real}"
        assert fake == real, f"{name} on inputs with strides {strides}: FakeTensorMode {fake} != CPU {real}"


@needs_extension
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_activation_outputs_are_dense(layout):
    """Outputs are dense in the layout the rule names, never in the input's odd strides."""
    x = LAYOUTS[layout]()
    out = OPS.bn_act_apply(x, torch.ones(x.shape[1]), torch.zeros(x.shape[1]), None, "none", 0.0)
    channels_last = x.is_contiguous(memory_format=CL) and not x.is_contiguous()
    assert out.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format), (x.stride(), out.stride())
    torch.testing.assert_close(out, x, rtol=0, atol=0)


# the stride patterns opcheck sees below: not dense, or dense at an offset (opcheck's fake-tensor test
# compares the fake outputs' strides with the real ones, on every backend)
ODD_LAYOUTS = ["nchw_non_dense", "channels_last_non_dense", "channels_last_offset"]


def _device_act(make, device):
    def act():
        t = make()
        return t if device == "cpu" else _on_device(t, device)
    return act


def _on_device(t, device):
    storage = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype, device=device)
    out = storage.as_strided(t.size(), t.stride(), t.storage_offset())
    out.copy_(t)
    return out


@pytest.mark.parametrize("layout", ODD_LAYOUTS)
@pytest.mark.parametrize("backend", backend_params(include_triton=True))
def test_opcheck_on_odd_strides(backend, layout):
    """The autograd ops (add_relu, bn_act_train, bn_act_eval) on every backend, and the backend's kernel
    ops (cpu: the C++ ones; triton: triton_*), through opcheck on sliced / offset inputs."""
    device = device_of(backend)
    act = _device_act(LAYOUTS[layout], device)
    C = act().shape[1]

    def vec(grad=False):
        return (torch.rand(C, device=device) + 0.5).requires_grad_(grad)

    def leaf():
        return act().requires_grad_()

    cases = [
        (OPS.add_relu, (leaf(), leaf(), backend)),
        (OPS.bn_act_train, (leaf(), vec(True), vec(True), leaf(), 1e-5, "relu", 0.0, backend)),
        (OPS.bn_act_train, (leaf(), vec(True), vec(True), leaf(), 1e-5, "gelu", 0.0, backend)),
        (OPS.bn_act_eval, (leaf(), vec(), vec(), vec(True), vec(True), leaf(), 1e-5, "relu", 0.0, backend)),
        (OPS.bn_act_eval, (leaf(), vec(), vec(), vec(True), vec(True), leaf(), 1e-5, "hardswish", 0.0, backend)),
    ]
    if backend in ("cpu", "triton"):
        prefix = "triton_" if backend == "triton" else ""
        cases += [(getattr(OPS, prefix + name.split("(")[0]), args) for name, args in _calls(act)]
        cases = [(op, tuple(_move(a, device) for a in args)) for op, args in cases]
    for op, args in cases:
        torch.library.opcheck(op, args)


def _move(a, device):
    return a.to(device) if isinstance(a, torch.Tensor) and a.device.type != device else a
