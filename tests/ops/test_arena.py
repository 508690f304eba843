"""The CPU arena (resnet_fused/ops/arena.py, csrc/cpu_arena.cpp): fused CPU layers, in inference and in
training, reuse the memory their outputs (and saved tensors) freed, never a block still in use, without
changing a value; nothing outside its scope is pooled; RESNET_FUSED_CPU_ARENA_MB=0 leaves the allocator
alone."""

import copy
import os
import resource
import subprocess
import sys
import threading

import pytest
import torch
import torchvision
from torch import nn

import resnet_fused
from helpers import assert_within_eager_error, randomize_bn
from resnet_fused import backends
from resnet_fused.ops import arena

pytestmark = pytest.mark.skipif(not backends.has_extension(), reason="resnet_fused._C is not built")


def _model(training: bool = False):
    torch.manual_seed(0)
    block = randomize_bn(torchvision.models.resnet.Bottleneck(64, 16, downsample=None)).train(training)
    return block.to(memory_format=torch.channels_last)


def _input():
    return torch.randn(2, 64, 16, 16).contiguous(memory_format=torch.channels_last)


def test_outputs_reuse_freed_blocks_and_keep_their_values():
    eager = _model()
    fused = resnet_fused.fuse_(copy.deepcopy(eager), backend="cpu")
    x = _input()
    with torch.no_grad():
        first = fused(x)
        expected = first.clone()
        ptr = first.data_ptr()
        del first  # its block goes back to the arena
        assert arena.cached_bytes() > 0
        second = fused(x)
        assert second.data_ptr() == ptr, "the next call's output did not reuse the freed block"
        torch.testing.assert_close(second, expected, rtol=0, atol=0)
        assert_within_eager_error(second, eager(x), copy.deepcopy(eager).double()(x.double()), "fused block, arena")


def test_live_outputs_are_never_reused():
    fused = resnet_fused.fuse_(_model(), backend="cpu")
    x = _input()
    with torch.no_grad():
        kept = [fused(x * (i + 1)) for i in range(4)]  # all alive at once
        expected = [fused(x * (i + 1)).clone() for i in range(4)]
    assert len({t.data_ptr() for t in kept}) == 4
    for got, want in zip(kept, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _results(model, x, out, grad):
    """out and the gradients of x and of every parameter of model, out's backward taken with grad_output `grad`."""
    return [out.detach(), *torch.autograd.grad(out, [x, *model.parameters()], grad)]


def _training_step(model, x, grad):
    """_results of one forward + backward of model on x."""
    x = x.detach().requires_grad_()
    return _results(model, x, model(x), grad)


def _conv_bn_relu():
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()))


def _bn_relu():
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.BatchNorm2d(64), nn.ReLU()))


@pytest.mark.parametrize("build", [lambda: _model(training=True), _conv_bn_relu, _bn_relu],
                         ids=["bottleneck", "conv_bn_relu", "bn_relu"])
def test_training_reuses_freed_blocks_and_keeps_its_values(build):
    eager = build().train().to(memory_format=torch.channels_last)
    fused = resnet_fused.fuse_(copy.deepcopy(eager), backend="cpu")
    x = _input()
    grad = torch.randn_like(eager(x))
    arena.empty_cache()
    first = [t.clone() for t in _training_step(fused, x, grad)]  # the graph and its saved tensors freed on return
    cached = arena.cached_bytes()
    assert cached > 0, "the training step's outputs and saved tensors were not pooled"
    x2 = x.detach().requires_grad_()
    out = fused(x2)  # the forward takes its blocks from the arena
    assert arena.cached_bytes() < cached
    second = _results(fused, x2, out, grad)
    for got, want in zip(second, first):
        torch.testing.assert_close(got, want)
    exact = _training_step(copy.deepcopy(eager).double(), x.double(), grad.double())
    for i, (got, want, ref) in enumerate(zip(second, _training_step(copy.deepcopy(eager), x, grad), exact)):
        assert_within_eager_error(got, want, ref, f"fused training block, arena, result {i}")


def test_training_graphs_kept_alive_keep_their_saved_tensors():
    """Four forward passes with their graphs alive at once, then their backward passes: a saved tensor in a
    block still in use would have been overwritten by a later forward."""
    fused = resnet_fused.fuse_(_model(training=True), backend="cpu")
    inputs = [(_input() * (i + 1)).requires_grad_() for i in range(4)]
    grads = [torch.randn_like(x) for x in inputs]
    expected = [_training_step(copy.deepcopy(fused), x, g) for x, g in zip(inputs, grads)]
    outs = [fused(x) for x in inputs]
    for x, out, g, want in zip(inputs, outs, grads, expected):
        for a, b in zip(_results(fused, x, out, g), want):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("op", ["bn_stats", "bn_act_backward_reduce"])
def test_channels_last_statistics_map_no_new_pages_in_the_arena(op):
    """The CPU statistics kernels keep per-chunk fp64 partials, chunks x C of them in channels_last (1.6 MB at
    16x256x56x56). They come from the tensor allocator, so a warm call in the arena reuses them; as std::vectors
    glibc returned them to the system at each free (as its trim heuristics had it) and they faulted in again (seen
    for bn_stats: 752 page faults per call at this shape, 1536 and 1.7x the kernel's time at batch 32 on a 2-core
    VM; bn_act_backward_reduce's one vector of both sums stayed mapped there, and is checked for the same rule)."""
    torch.manual_seed(0)
    x = torch.randn(16, 256, 56, 56).contiguous(memory_format=torch.channels_last)
    args = (x,) if op == "bn_stats" else (torch.randn_like(x), x, torch.randn(256), None)

    def call():
        return getattr(torch.ops.resnet_fused, op)(*args)

    with arena.scope(x):
        expected = [t.clone() for t in call()]
        call()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(4):
            got = call()
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 4
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert faults < 20, f"resnet_fused::{op} on {tuple(x.shape)} channels_last: {faults:.0f} page faults per warm call"


def test_allocations_outside_a_scope_are_not_pooled():
    arena.empty_cache()
    t = torch.empty(1 << 20)  # 4 MiB, plain PyTorch
    del t
    assert arena.cached_bytes() == 0


def test_empty_cache_returns_the_blocks():
    fused = resnet_fused.fuse_(_model(), backend="cpu")
    with torch.no_grad():
        fused(_input())
    assert arena.cached_bytes() > 0
    arena.empty_cache()
    assert arena.cached_bytes() == 0


def test_threads_share_the_arena_safely():
    fused = resnet_fused.fuse_(_model(), backend="cpu")
    inputs = [_input() for _ in range(4)]
    with torch.no_grad():
        expected = [fused(x) for x in inputs]
    errors = []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(20):
                    torch.testing.assert_close(fused(inputs[i]), expected[i], rtol=0, atol=0)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_turned_off_leaves_the_allocator_alone():
    code = ("import torch, resnet_fused, copy, torchvision; from resnet_fused.ops import arena; "
            "m = resnet_fused.fuse_(torchvision.models.resnet18().eval(), backend='cpu'); "
            "torch.no_grad()(m)(torch.randn(1, 3, 64, 64)); "
            "assert arena._arena() is None and arena.cached_bytes() == 0; print('ok')")
    root = os.path.dirname(os.path.dirname(resnet_fused.__file__))
    env = {**os.environ, "RESNET_FUSED_CPU_ARENA_MB": "0", "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
