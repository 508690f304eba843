"""The cuDNN graphs of the cuda backend (csrc/cudnn/: in training conv with genstats in its epilogue, and with the
previous BN + ReLU as its prologue; in eval the folded conv with its bias (+ residual) (+ ReLU)), on a GPU with a build
that has them (skipped, visibly, elsewhere): resnet_fused::conv_genstats against float64 at ResNet shapes with and
without the input BN, that the graph (not the fallback) ran, the fallbacks (bf16 where cuDNN has no engine, odd
channels, NCHW), a fused block's training step (the deferred data flow) against eager and float64, CUDA-graph capture;
conv_act_stage's conv + epilogue graph against float64, and folded blocks in eval through it."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.profiler import profile

import resnet_fused
from helpers import CL, NCHW, activation, assert_within_eager_error
from resnet_fused import reference
from resnet_fused.activations import Activation
from resnet_fused.ops import cudnn

OPS = torch.ops.resnet_fused
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not cudnn.graphs_built(), reason="resnet_fused._C built without the cuDNN graphs (no cudnn-frontend)"),
]
# (N, Cin, H, Cout, kernel, stride, padding): ResNet-18 / 50 convs at batch 32 (the 1x1 and 3x3 of layer1, a strided
# 3x3 and a strided 1x1 projection of layer2)
CONVS = [(32, 64, 56, 64, 3, 1, 1), (32, 256, 56, 64, 1, 1, 0), (32, 128, 56, 128, 3, 2, 1), (32, 256, 56, 512, 1, 2, 0)]


@pytest.fixture
def graphs_on():
    with cudnn.graphs(True):
        yield


def _report_of(before: int) -> list[tuple[str, str]]:
    return cudnn.graph_report()[before:]


def _stats_close(mean, var, y, what):
    # the statistics of the y the op returned, against float64 ones of it: genstats sums y and y^2 in fp32 and the
    # finalize takes var = E[y^2] - mean^2, whose rounding scales with E[y^2] = var + mean^2
    y64 = y.double()
    m64, v64 = y64.mean((0, 2, 3)), y64.var((0, 2, 3), unbiased=False)
    scale = v64 + m64.square()
    assert ((mean.double() - m64).abs() <= 1e-4 * scale.sqrt() + 1e-6).all(), f"{what}: mean"
    assert ((var.double() - v64).abs() <= 1e-4 * scale + 1e-6).all(), f"{what}: var"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: f"{c[1]}to{c[3]}k{c[4]}s{c[5]}")
def test_conv_genstats_graph_matches_float64(conv, dtype, graphs_on):
    """channels_last: y and the gradients of y under the eager-error rule (2-norm over each tensor), the statistics
    against float64 statistics of the returned y. fp16: the graph was built (cuDNN gave no reason) for a signature the
    H200 probe found supported; bf16 (no genstats engine there): built by the reduction-node form or declined, printed
    (the GPU run finds out), the same function either way."""
    n, cin, hw, cout, k, s, p = conv
    x = activation((n, cin, hw, hw), dtype, CL, "cuda").requires_grad_()
    w = (torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5).to(dtype).contiguous(memory_format=CL)
    w.requires_grad_()
    before = len(cudnn.graph_report())
    y, mean, var = OPS.conv_genstats(x, w, [s, s], [p, p], [1, 1])
    new = _report_of(before)
    assert len(new) == 1, new
    if dtype == torch.float16:
        assert new[0][1] == "" and "statistics by genstats" in new[0][0], f"expected the genstats graph, got {new}"
    print(new[0][0], "| built" if not new[0][1] else f"| declined: {new[0][1]}")
    assert y.is_contiguous(memory_format=CL) and y.dtype == dtype
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w)]
    exact = reference.conv_genstats(*leaves64, [s, s], [p, p], [1, 1])
    eager = F.conv2d(x, w, None, s, p)
    assert_within_eager_error(y, eager, exact[0], f"y {conv}", norm="fro")
    _stats_close(mean, var, y, f"{conv}")
    grad = torch.randn_like(eager)
    got = torch.autograd.grad(y, (x, w), grad)
    ref = torch.autograd.grad(eager, (x, w), grad)
    ex = torch.autograd.grad(exact[0], leaves64, grad.double())
    for name, g, e, x64 in zip(("input", "weight"), got, ref, ex):
        assert_within_eager_error(g, e, x64, f"grad {name} {conv}", norm="fro", factor=3.0)
    y2, _, _ = OPS.conv_genstats(x, w, [s, s], [p, p], [1, 1])  # the cached graph: nothing new in the report
    assert len(_report_of(before)) == 1 and torch.equal(y2, y)


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: f"{c[1]}to{c[3]}k{c[4]}s{c[5]}")
def test_conv_genstats_input_bn_graph_matches_float64(conv, graphs_on):
    """The prologue graph (relu(x * scale + shift) on load, conv, genstats), fp16 channels_last: built (the report
    names the coefficients' dtype), y and the gradients of x, the conv weight and the input BN's weight and bias under
    the eager-error rule (2-norm per tensor). x's channel means sit at 2 standard deviations from zero, so that the BN's
    shift cancels most of x * scale: fp16 coefficients would show there (an fp16 ulp of |x * scale|, ~4x eager's)."""
    n, cin, hw, cout, k, s, p = conv
    x = activation((n, cin, hw, hw), torch.float16, CL, "cuda", scale=0.5, offset=1.0).requires_grad_()
    w = (torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5).half().contiguous(memory_format=CL)
    w.requires_grad_()
    bw = (torch.rand(cin, device="cuda") + 0.5).requires_grad_()
    bb = (torch.randn(cin, device="cuda") * 0.3).requires_grad_()
    var, mean = torch.var_mean(x.detach().float(), (0, 2, 3), correction=0)
    before = len(cudnn.graph_report())
    y, y_mean, y_var = OPS.conv_genstats(x, w, [s, s], [p, p], [1, 1], mean, var, bw, bb, 1e-5)
    new = _report_of(before)
    assert len(new) == 1 and new[0][1] == "" and new[0][0].startswith("bn-relu + conv + genstats"), new
    print(new[0][0])  # which coefficient dtype cuDNN took
    leaves = (x, w, bw, bb)

    def bn_relu_conv(x, w, bw, bb):
        return F.conv2d(torch.relu(F.batch_norm(x, None, None, bw, bb, True, 0.0, 1e-5)), w, None, s, p)

    eager = bn_relu_conv(*leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    exact = bn_relu_conv(*leaves64)
    assert y.is_contiguous(memory_format=CL) and y.dtype == torch.float16
    assert_within_eager_error(y, eager, exact, f"y {conv}", norm="fro")
    _stats_close(y_mean, y_var, y, f"{conv}")
    grad = torch.randn_like(eager)
    got = torch.autograd.grad(y, leaves, grad)
    ref = torch.autograd.grad(eager, leaves, grad)
    ex = torch.autograd.grad(exact, leaves64, grad.double())
    for name, g, e, x64 in zip(("input", "weight", "bn weight", "bn bias"), got, ref, ex):
        assert_within_eager_error(g, e, x64, f"grad {name} {conv}", norm="fro", factor=3.0)
    backward = _report_of(before)[1:]  # the backward's two graphs, built or declined (then aten's passes ran above)
    assert sorted(what.split(",")[0] for what, _ in backward) == ["bn-relu + wgrad", "dgrad + drelu + dbn-weight"], backward
    for what, reason in backward:
        print(what, "| built" if not reason else f"| declined: {reason}")


@pytest.mark.parametrize("conv", CONVS[:2], ids=lambda c: f"{c[1]}to{c[3]}k{c[4]}s{c[5]}")
def test_backward_graphs_build_at_resnet_shapes(conv, graphs_on):
    """cuDNN has engines for the backward's two patterns at the unstrided 3x3 and 1x1 convs of ResNet layer1, fp16
    (DgradDreluBNBwdWeight and ConvBNwgrad, cuDNN >= 9.8 on Ampere / Hopper): both built, no reason given."""
    n, cin, hw, cout, k, s, p = conv
    n //= 2  # signatures no other test built
    x = activation((n, cin, hw, hw), torch.float16, CL, "cuda", offset=0.5).requires_grad_()
    w = (torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5).half().contiguous(memory_format=CL)
    w.requires_grad_()
    var, mean = torch.var_mean(x.detach().float(), (0, 2, 3), correction=0)
    before = len(cudnn.graph_report())
    y, _, _ = OPS.conv_genstats(x, w, [s, s], [p, p], [1, 1], mean, var, None, None, 1e-5)
    y.backward(torch.randn_like(y))
    new = _report_of(before)
    assert len(new) == 3 and all(reason == "" for _, reason in new), new


def test_backward_graphs_take_offset_parameter_views(graphs_on):
    """The input BN's weight, bias and mean as views 4 bytes into flat buffers (a flattened parameter store): the graphs
    read 16-byte aligned copies of them; the gradients of x, w and the flat parameters within eager's error (2-norm)."""
    n, cin, hw, cout, k, s, p = CONVS[0]
    n //= 4
    x = activation((n, cin, hw, hw), torch.float16, CL, "cuda", offset=0.5).requires_grad_()
    w = (torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5).half().contiguous(memory_format=CL)
    w.requires_grad_()
    flat = torch.cat([torch.zeros(1), torch.rand(cin) + 0.5, torch.randn(cin) * 0.3]).cuda().requires_grad_()
    var, mean = torch.var_mean(x.detach().float(), (0, 2, 3), correction=0)
    mean = torch.cat([torch.zeros(1, device="cuda"), mean])[1:]
    leaves = (x, w, flat)

    def step(x, w, flat, op):
        bw, bb = flat[1:cin + 1], flat[cin + 1:]
        if op:
            y = OPS.conv_genstats(x, w, [s, s], [p, p], [1, 1], mean, var, bw, bb, 1e-5)[0]
        else:
            y = F.conv2d(torch.relu(F.batch_norm(x, None, None, bw, bb, True, 0.0, 1e-5)), w, None, s, p)
        return y

    got_y = step(*leaves, True)
    grad = torch.randn_like(got_y)
    got = torch.autograd.grad(got_y, leaves, grad)
    ref = torch.autograd.grad(step(*leaves, False), leaves, grad)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ex = torch.autograd.grad(step(*leaves64, False), leaves64, grad.double())
    for name, g, e, x64 in zip(("input", "weight", "bn parameters"), got, ref, ex):
        assert_within_eager_error(g, e, x64, f"grad {name}", norm="fro", factor=3.0)


def test_conv_genstats_fallbacks(graphs_on):
    """Where no graph runs, the composite (aten's conv, then bn_stats) gives the same function: bf16 (cuDNN 9.19 on the
    H200 built no genstats graph; the reduction-node form is tried next: built or declined, reported once, a second
    call reuses the decision), channels not a multiple of 8 and NCHW (not tried at all: nothing reported)."""
    x = activation((8, 64, 14, 14), torch.bfloat16, CL, "cuda")
    w = (torch.randn(64, 64, 3, 3, device="cuda") / 24).bfloat16().contiguous(memory_format=CL)
    before = len(cudnn.graph_report())
    for _ in range(2):
        y, mean, var = OPS.conv_genstats(x, w, [1, 1], [1, 1], [1, 1])
        assert_within_eager_error(y, F.conv2d(x, w, None, 1, 1), F.conv2d(x.double(), w.double(), None, 1, 1), "bf16 y",
                                  norm="fro")
        _stats_close(mean, var, y, "bf16")
    assert len(_report_of(before)) == 1  # built or declined once, either way
    for x, w in ((activation((4, 12, 9, 9), torch.float16, CL, "cuda"),
                  torch.randn(12, 12, 3, 3, device="cuda").half().contiguous(memory_format=CL)),
                 (activation((4, 16, 9, 9), torch.float16, NCHW, "cuda"), torch.randn(16, 16, 3, 3, device="cuda").half())):
        before = len(cudnn.graph_report())
        y, mean, var = OPS.conv_genstats(x, w, [1, 1], [1, 1], [1, 1])
        assert _report_of(before) == []
        assert_within_eager_error(y, F.conv2d(x, w, None, 1, 1), F.conv2d(x.double(), w.double(), None, 1, 1), "fallback y",
                                  norm="fro")
        _stats_close(mean, var, y, "fallback")


@pytest.mark.parametrize("offset", [3.0, 10.0], ids=["mean3sigma", "mean10sigma"])
def test_conv_genstats_normalizes_channels_far_from_zero_mean(offset, graphs_on):
    """genstats sums y and y^2 in fp32 and var = E[y^2] - mean^2 loses digits as mean^2 / var grows (a conv of
    non-negative activations). What that costs where it matters, the BN output: y normalized with the graph's
    statistics (bn_scale_shift, bn_act_apply: the block's path) against y normalized with float64 statistics of the
    same y, within 2x eager's error (F.batch_norm of that y in fp16), channel means 3 and 10 standard deviations out."""
    x = activation((32, 64, 28, 28), torch.float16, CL, "cuda", offset=offset)
    w = (torch.eye(64, device="cuda") + torch.randn(64, 64, device="cuda") * 0.01).half().view(64, 64, 1, 1)
    w = w.contiguous(memory_format=CL)
    before = len(cudnn.graph_report())
    y, mean, var = OPS.conv_genstats(x, w, [1, 1], [0, 0], [1, 1])
    new = _report_of(before)
    print(new, f"mean/std up to {(mean / var.sqrt()).abs().max().item():.1f}")
    scale, shift = OPS.bn_scale_shift(mean, var, None, None, 1e-5)
    got = OPS.bn_act_apply(y, scale, shift, None, "none", 0.0)
    y64 = y.double()
    exact = F.batch_norm(y64, None, None, None, None, True, 0.0, 1e-5)
    eager = F.batch_norm(y, None, None, None, None, True, 0.0, 1e-5)
    assert_within_eager_error(got, eager, exact, f"BN output, channel means {offset} sigma out")


def test_conv_genstats_follows_torch_cudnn_switches(graphs_on):
    """cuDNN disabled, or deterministic algorithms asked for (genstats sums across thread blocks in no fixed order): no
    graph is tried (nothing reported) and the passes run, deterministic: two calls give the same bits."""
    x = activation((4, 32, 10, 10), torch.float16, CL, "cuda")
    w = (torch.randn(32, 32, 3, 3, device="cuda") / 17).half().contiguous(memory_format=CL)
    for switches in (lambda: torch.backends.cudnn.flags(enabled=False),
                     lambda: torch.backends.cudnn.flags(enabled=True, deterministic=True)):
        before = len(cudnn.graph_report())
        with switches():
            first, second = (OPS.conv_genstats(x, w, [1, 1], [1, 1], [1, 1]) for _ in range(2))
        assert _report_of(before) == []
        for a, b in zip(first, second):
            assert torch.equal(a, b)
        _stats_close(first[1], first[2], first[0], "switches")


def test_conv_genstats_first_seen_under_capture_runs_the_passes(graphs_on):
    """A signature first seen while a CUDA graph captures is not built then (a build may compile and allocate): the
    captured call runs the passes (aten's conv, warmed up before, and bn_stats), nothing is cached or reported, and the
    first call outside the capture builds the graph."""
    x = activation((4, 48, 12, 12), torch.float16, CL, "cuda")
    w = (torch.randn(48, 48, 3, 3, device="cuda") / 20).half().contiguous(memory_format=CL)
    with cudnn.graphs(False):
        want = OPS.conv_genstats(x, w, [1, 1], [1, 1], [1, 1])  # aten's conv warmed up at this shape
    before = len(cudnn.graph_report())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = OPS.conv_genstats(x, w, [1, 1], [1, 1], [1, 1])
    graph.replay()
    torch.cuda.synchronize()
    assert _report_of(before) == []
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    OPS.conv_genstats(x, w, [1, 1], [1, 1], [1, 1])
    assert len(_report_of(before)) == 1


def test_conv_genstats_opcheck(graphs_on):
    x = activation((2, 16, 8, 8), torch.float16, CL, "cuda").requires_grad_()
    w = torch.randn(16, 16, 3, 3, device="cuda").half().contiguous(memory_format=CL).requires_grad_()
    torch.library.opcheck(OPS.conv_genstats, (x, w, [1, 1], [1, 1], [1, 1]))
    var, mean = torch.var_mean(x.detach().float(), (0, 2, 3), correction=0)
    bw, bb = (torch.rand(16, device="cuda") + 0.5).requires_grad_(), torch.randn(16, device="cuda").requires_grad_()
    torch.library.opcheck(OPS.conv_genstats, (x, w, [1, 1], [1, 1], [1, 1], mean, var, bw, bb, 1e-5))


def _block_twins(kind: str, train: bool, perturb_bn: bool = False):
    """A torchvision `kind` block at ResNet layer1's widths three ways, the same weights: eager fp16 channels_last, a
    float64 twin, and a copy fused on the cuda backend; BN statistics and biases drawn away from (0, 1) with
    perturb_bn (eval: a folded bias that matters). Returns (eager, exact, fused, inplanes, planes)."""
    torch.manual_seed(0)
    inplanes, planes = (64, 64) if kind == "BasicBlock" else (256, 64)
    make = getattr(torchvision.models.resnet, kind)
    eager = make(inplanes, planes).cuda().train(train)
    if perturb_bn:
        for m in eager.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.bias.data.uniform_(-0.5, 0.5)
    exact = make(inplanes, planes).cuda().double().train(train)
    exact.load_state_dict(eager.state_dict())
    eager = eager.half().to(memory_format=CL)
    fused = make(inplanes, planes).cuda().half().to(memory_format=CL).train(train)
    fused.load_state_dict(eager.state_dict())
    resnet_fused.fuse_(fused, backend="cuda")
    return eager, exact, fused, inplanes, planes


def _block_step(block, x, grad):
    out = block(x)
    grads = torch.autograd.grad(out, [x, *block.parameters()], grad)
    return [out.detach(), *grads]


@pytest.mark.parametrize("kind", ["BasicBlock", "Bottleneck"])
def test_fused_block_training_with_graphs(kind):
    """A torchvision block fused on the cuda backend, fp16 channels_last, one training step with the graphs on: the
    deferred data flow (every conv through conv_genstats's graph, all but the first with the previous BN + ReLU as
    its prologue: no aten conv forward and no activation written by bn_act_apply; each signature's graph built), and
    the output, every gradient and the running statistics agree with eager fp16 against a float64 twin (2-norm per
    tensor, 2x eager's error)."""
    eager, exact, fused, inplanes, planes = _block_twins(kind, train=True)
    x = activation((16, inplanes, 28, 28), torch.float16, CL, "cuda").requires_grad_()
    grad = torch.randn(16, planes * (4 if kind == "Bottleneck" else 1), 28, 28, device="cuda").half()
    before = len(cudnn.graph_report())
    with cudnn.graphs(True):
        with profile() as prof:
            out = fused(x)
        with profile() as prof_backward:
            got = [out.detach(), *torch.autograd.grad(out, [x, *fused.parameters()], grad)]
    names = {e.name for e in prof.events()}
    assert "resnet_fused::conv_genstats" in names and "aten::conv2d" not in names, sorted(names)
    assert "resnet_fused::bn_act_apply" not in names, "an inner activation was written in the forward"
    new = _report_of(before)
    forward = [e for e in new if "genstats" in e[0]]  # its conv signatures, each built (the first without a prologue)
    convs = 2 if kind == "BasicBlock" else 3
    assert len(forward) == convs and all(reason == "" for _, reason in forward), forward
    assert sum(what.startswith("bn-relu") for what, _ in forward) == convs - 1, forward
    backward = [e for e in new if "genstats" not in e[0]]  # dgrad + drelu + dbn-weight and the wgrad per deferred conv
    assert len(backward) == 2 * (convs - 1), backward
    for what, reason in backward:
        print(what, "| built" if not reason else f"| declined: {reason}")
    if all(reason == "" for _, reason in backward):  # the backward recomputes no activation either
        assert "resnet_fused::bn_act_apply" not in {e.name for e in prof_backward.events()}
    ref = _block_step(eager, x, grad)
    x64 = x.detach().double().requires_grad_()
    ex = _block_step(exact, x64, grad.double())
    for i, (g, e, x_) in enumerate(zip(got, ref, ex)):
        assert_within_eager_error(g, e, x_, f"{kind} [{i}]", norm="fro")
    for name, buf in fused.named_buffers():
        if buf.is_floating_point():
            assert_within_eager_error(buf, dict(eager.named_buffers())[name], dict(exact.named_buffers())[name], name)
    counters = [b.item() for b in fused.buffers() if not b.is_floating_point()]
    assert counters == [1] * len(counters), "num_batches_tracked: once per BN per step"


def test_graphs_under_cuda_graph_capture():
    """A fused BasicBlock's training forward and backward, graphs on, captured into a CUDA graph after warm-up (the
    cuDNN graphs are built on the warm-up calls) and replayed: the replay gives the eager-mode call's output."""
    block = torchvision.models.resnet.BasicBlock(64, 64).cuda().half().to(memory_format=CL).train()
    resnet_fused.fuse_(block, backend="cuda")
    x = activation((8, 64, 14, 14), torch.float16, CL, "cuda").requires_grad_()
    grad = torch.randn(8, 64, 14, 14, device="cuda").half()
    with cudnn.graphs(True):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                want = block(x)
                want.backward(grad)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = block(x)
            out.backward(grad)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, want.detach(), rtol=0, atol=0)


def test_tune_times_the_deferred_block_with_the_graphs_on():
    """With the graphs on, `tune` has both ways of a training block on CUDA: deferred (cuda-defer) and not (cuda)."""
    from resnet_fused import tuning

    with cudnn.graphs(True):
        names = [c.name for c in tuning.candidates(torch.device("cuda"), training=True, backward=True)]
    assert {"cuda-defer", "cuda"} <= set(names), names
    assert "cuda-defer" not in [c.name for c in tuning.candidates(torch.device("cuda"), training=True, backward=True)]
    # a choice made with the graphs on is not reused with them off, nor the other way
    block = torchvision.models.resnet.BasicBlock(64, 64).cuda().half().to(memory_format=CL)
    x = activation((8, 64, 14, 14), torch.float16, CL, "cuda")
    off = tuning.signature(block, x, None, True, True)
    with cudnn.graphs(True):
        assert tuning.signature(block, x, None, True, True) != off


# ---- eval: the folded conv with its bias (+ residual) (+ ReLU) as one graph (conv_act_stage's fused_conv) ----


def _conv_epilogue(x, w, b, r, s, p, relu):
    y = F.conv2d(x, w, b, s, p)
    y = y + r if r is not None else y
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bias,residual,relu", [(True, False, True), (True, False, False), (True, True, False),
                                                (False, False, True)], ids=["bias-relu", "bias", "bias-add", "relu"])
@pytest.mark.parametrize("conv", CONVS[:3], ids=lambda c: f"{c[1]}to{c[3]}k{c[4]}s{c[5]}")
def test_conv_epilogue_graph_matches_float64(conv, bias, residual, relu, dtype, graphs_on):
    """conv_act_stage with fused_conv=True where aten has no one-call path (no residual + ReLU pair): our conv +
    epilogue graph at ResNet shapes, the bias in fp32 as a plan holds it, the output's memory NaN-poisoned first.
    fp16: built (no reason given); bf16: built or declined, printed (the GPU run finds out), the same function either
    way; the output within 2x eager's error (2-norm) of float64, channels_last, no NaN."""
    n, cin, hw, cout, k, s, p = conv
    n //= 4
    x = activation((n, cin, hw, hw), dtype, CL, "cuda")
    w = (torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5).to(dtype).contiguous(memory_format=CL)
    b = torch.randn(cout, device="cuda") if bias else None
    out_shape = (n, cout, (hw + 2 * p - k) // s + 1, (hw + 2 * p - k) // s + 1)
    r = activation(out_shape, dtype, CL, "cuda") if residual else None
    torch.cuda.synchronize()
    poison = torch.full(out_shape, float("nan"), dtype=dtype, device="cuda").contiguous(memory_format=CL)
    del poison  # the output's allocation gets this NaN-filled block back
    before = len(cudnn.graph_report())
    with torch.no_grad():
        out = OPS.conv_act_stage(x, w, b, r, [s, s], [p, p], [1, 1], 1, "relu" if relu else "none", 0.0, True)
    new = _report_of(before)
    assert len(new) == 1 and new[0][0].startswith("conv + "), new
    print(new[0][0], "| built" if not new[0][1] else f"| declined: {new[0][1]}")
    if dtype == torch.float16:
        assert new[0][1] == "", new
    eager = _conv_epilogue(x, w, b.to(dtype) if bias else None, r, s, p, relu)
    exact = _conv_epilogue(*(t.double() if t is not None else None for t in (x, w, b, r)), s, p, relu)
    assert out.is_contiguous(memory_format=CL) and out.dtype == dtype and not out.isnan().any()
    assert_within_eager_error(out, eager, exact, f"conv epilogue {conv} {dtype}", norm="fro")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("act", [Activation("relu6"), Activation("leaky_relu", 0.1), Activation("silu"), Activation("gelu"),
                                 Activation("gelu_tanh")], ids=str)
def test_conv_epilogue_graph_activations(act, dtype, graphs_on):
    """The epilogue graph's other activations (cuDNN's pointwise modes: clipped / sloped RELU_FWD, SWISH_FWD, GELU_FWD,
    GELU_APPROX_TANH_FWD) after the bias, a ResNet 3x3 conv, pre-activations spread over [-8, 8] (relu6's clip and
    leaky_relu's slope both matter): built or declined, printed; the output within 2x eager's error (2-norm) of
    float64, NaN-poisoned first."""
    n, cin, hw, cout, k, s, p = CONVS[0]
    n //= 4
    x = activation((n, cin, hw, hw), dtype, CL, "cuda")
    w = (4 * torch.randn(cout, cin, k, k, device="cuda") / (cin * k * k) ** 0.5).to(dtype).contiguous(memory_format=CL)
    b = torch.randn(cout, device="cuda")
    out_shape = (n, cout, hw, hw)
    torch.cuda.synchronize()
    poison = torch.full(out_shape, float("nan"), dtype=dtype, device="cuda").contiguous(memory_format=CL)
    del poison  # the output's allocation gets this NaN-filled block back
    before = len(cudnn.graph_report())
    with torch.no_grad():
        out = OPS.conv_act_stage(x, w, b, None, [s, s], [p, p], [1, 1], 1, act.name, act.alpha, True)
    new = _report_of(before)
    assert len(new) == 1 and new[0][0].startswith(f"conv + bias + {act.name}"), new
    print(new[0][0], "| built" if not new[0][1] else f"| declined: {new[0][1]}")
    eager = act(F.conv2d(x, w, b.to(dtype), s, p))
    exact = act(F.conv2d(x.double(), w.double(), b.double(), s, p))
    assert out.is_contiguous(memory_format=CL) and out.dtype == dtype and not out.isnan().any()
    assert_within_eager_error(out, eager, exact, f"conv epilogue {act} {dtype}", norm="fro")


@pytest.mark.parametrize("kind", ["BasicBlock", "Bottleneck"])
def test_folded_block_eval_with_graphs(kind):
    """A torchvision block fused on the cuda backend, fp16 channels_last, eval, graphs on: every conv is one cuDNN call
    (aten's conv + add + bias + ReLU for the last, our conv + epilogue graph for the others, each built): no
    bn_act_apply pass; the output within 2x eager's error of a float64 twin; the same again under CUDA-graph capture."""
    eager, exact, fused, inplanes, _ = _block_twins(kind, train=False, perturb_bn=True)
    x = activation((8, inplanes, 28, 28), torch.float16, CL, "cuda")
    before = len(cudnn.graph_report())
    with cudnn.graphs(True), torch.no_grad():
        with profile() as prof:
            out = fused(x)
        new = _report_of(before)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fused(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fused(x)
        graph.replay()
        torch.cuda.synchronize()
    inner = 1 if kind == "BasicBlock" else 2
    assert len(new) == inner and all(what.startswith("conv + bias + relu") and reason == "" for what, reason in new), new
    names = {e.name for e in prof.events()}
    assert "resnet_fused::bn_act_apply" not in names, sorted(names)
    with torch.no_grad():
        assert_within_eager_error(out, eager(x), exact(x.double()), f"{kind} eval", norm="fro")
    torch.testing.assert_close(captured, out, rtol=0, atol=0)
