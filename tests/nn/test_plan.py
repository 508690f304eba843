"""A fused layer's plan (resnet_fused/nn/plan.py): decided once per input signature, one C++ op per stage on the
cpu backend, made again when what it depends on changes; the result always the unfused twin's."""

import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn
from torch.profiler import profile

import resnet_fused
from helpers import CL, activation, assert_within_eager_error, needs_extension, randomize_bn, rel_err
from resnet_fused import backends
from resnet_fused.nn import FusedBasicBlock, FusedBottleneck, FusedConvBNReLU

TV = torchvision.models.resnet
pytestmark = needs_extension


def _outermost_ops(fn) -> list[str]:
    fn()
    with profile() as p:
        fn()
    return [e.name for e in p.events() if e.cpu_parent is None and "::" in e.name and not e.name.startswith("autograd::")]


def _pair(kind="basic", projection=False):
    planes, stride = (8, 2) if projection else (8, 1)
    inplanes = 6 if projection else (8 if kind == "basic" else 32)
    out = planes * (1 if kind == "basic" else 4)
    down = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)) if projection else None
    eager = randomize_bn((TV.BasicBlock if kind == "basic" else TV.Bottleneck)(inplanes, planes, stride, down))
    return resnet_fused.fuse_(copy.deepcopy(eager)), eager


def _check(fused, eager, x, what):
    with torch.no_grad():
        exact = copy.deepcopy(eager).double()(x.double())
        # folding rounds w * s once: measured up to ~2.6x eager's max error (tests/ops/test_conv_bn_act.py), so 3x
        assert_within_eager_error(fused(x), eager(x), exact, what, factor=3.0)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("projection", [False, True], ids=["identity", "projection"])
def test_eval_block_is_one_conv_act_stage_per_conv(kind, projection):
    """Eval without gradients: each conv -> BN (-> add) -> ReLU is one conv_act_stage call, the projection
    shortcut one more; nothing else dispatched, fewer ops than eager."""
    fused, eager = _pair(kind, projection)
    fused.eval(), eager.eval()
    x = activation((2, fused.conv1.in_channels, 6, 6), torch.float32, CL)
    with torch.no_grad():
        ops = _outermost_ops(lambda: fused(x))
        eager_ops = _outermost_ops(lambda: eager(x))
    assert ops == ["resnet_fused::conv_act_stage"] * (fused.num_convs + projection), ops
    assert len(ops) < len(eager_ops)
    _check(fused, eager, x, f"{kind} eval")


def _recorded_resolutions(monkeypatch) -> list:
    """The arguments of every backends.resolve call from now on (the calls still resolve)."""
    calls, real = [], backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda *a: calls.append(a) or real(*a))
    return calls


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_backend_resolution_per_call(training, monkeypatch):
    """Routing is decided once per signature: after the first call a block's forward resolves no backend and makes
    no plan (the issue's bound: at most one resolution per block call)."""
    fused, _ = _pair("bottleneck", projection=True)
    fused.train(training)
    x = activation((2, 6, 6, 6), torch.float32, CL)
    fused(x)
    calls = _recorded_resolutions(monkeypatch)
    made = []
    real_make = type(fused)._make_plan
    monkeypatch.setattr(type(fused), "_make_plan", lambda self, x, *a: made.append(x.shape) or real_make(self, x, *a))
    for _ in range(3):
        fused(x)
    assert calls == [] and made == [], (calls, made)


def test_eval_plan_is_made_again_when_what_it_folded_changes():
    """A folded plan checks identity, version, storage and requires_grad of what it folded, and bn.eps: a replaced
    parameter, an in-place edit, new storage, a new eps, a parameter needing a gradient: each gives eager's result."""
    fused, eager = _pair("basic")
    fused.eval(), eager.eval()
    x = activation((2, 8, 5, 5), torch.float32, CL)
    _check(fused, eager, x, "first")
    w, v = torch.randn_like(eager.conv1.weight), torch.randn_like(eager.conv2.weight)
    edits = {
        "a replaced parameter": lambda m: setattr(m.conv1, "weight", nn.Parameter(w.clone())),
        "an in-place buffer update": lambda m: m.bn2.running_mean.add_(0.5),
        "new storage (p.data = ...)": lambda m: setattr(m.conv2.weight, "data", v.clone()),
        "a new eps": lambda m: setattr(m.bn1, "eps", 0.1),
    }
    for what, edit in edits.items():
        with torch.no_grad():
            edit(fused), edit(eager)
        _check(fused, eager, x, f"after {what}")
    xg = x.clone().requires_grad_()
    out = fused(xg)  # grad mode, parameters needing gradients: the unfolded stages, differentiable in every parameter
    out.sum().backward()
    assert fused.conv1.weight.grad is not None and fused.bn1.weight.grad is not None and xg.grad is not None
    eager_x = x.clone().requires_grad_()
    eager(eager_x).sum().backward()
    torch.testing.assert_close(fused.bn1.weight.grad, eager.bn1.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xg.grad, eager_x.grad, rtol=1e-4, atol=1e-4)


def test_plans_follow_mode_and_batchnorm_settings():
    """train() / eval(), a BN's own mode, momentum and momentum=None are read per call or keyed on: the running
    statistics and num_batches_tracked stay eager's through mode switches."""
    fused, eager = _pair("bottleneck", projection=True)
    x = activation((3, 6, 7, 7), torch.float32, CL)
    steps = [("train", None), ("eval", None), ("train", lambda m: setattr(m.bn2, "momentum", None)),
             ("train", lambda m: m.bn1.eval()), ("train", lambda m: m.downsample[1].eval()), ("eval", None), ("train", None)]
    for i, (mode, edit) in enumerate(steps):
        for m in (fused, eager):
            getattr(m, mode)()
            if edit is not None:
                edit(m)
        xs = x * (i + 1)
        if mode == "train":
            out, ref = fused(xs), eager(xs)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        else:
            _check(fused, eager, xs, f"step {i}")
        for (k, a), b in zip(eager.state_dict().items(), fused.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"step {i} {k}")


def test_fused_conv_bn_relu_plan_with_a_residual():
    """FusedConvBNReLU keys its plan on the residual too: with and without one, eval and train, eager's result."""
    m = randomize_bn(FusedConvBNReLU(5, 6, 3, padding=1))
    seq = nn.Sequential(copy.deepcopy(m.conv), copy.deepcopy(m.bn))
    x, r = activation((2, 5, 6, 6), torch.float32, CL), activation((2, 6, 6, 6), torch.float32, CL)
    for training in (False, True, False):
        m.train(training), seq.train(training)
        for residual in (None, r):
            with torch.no_grad():
                y = seq(x)
                ref = torch.relu(y + residual if residual is not None else y)
                torch.testing.assert_close(m(x, residual), ref, rtol=1e-4, atol=1e-5)


def test_blocks_with_plans_pickle_and_copy():
    """The plans are not state: a block pickles, deep-copies and loads as before, its copies starting with none."""
    block = FusedBasicBlock(8, 8).eval()
    x = activation((1, 8, 4, 4), torch.float32, CL)
    with torch.no_grad():
        y = block(x)
    assert len(block._plans) == 1
    for twin in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert len(twin._plans) == 0
        with torch.no_grad():
            torch.testing.assert_close(twin(x), y)
    assert isinstance(FusedBottleneck(32, 8)._plans, resnet_fused.nn.plan.PlanCache)


@pytest.mark.parametrize("choice", ["cpu-onednn", "cpu-aten"])
def test_a_tuned_block_runs_its_choice_as_a_plan(choice, monkeypatch, tmp_path):
    """backend="tune": each fused candidate is timed, and then run, as the plan of its backend and Variant: after
    the choice, a call is one conv_act_stage per conv (oneDNN's post-ops or aten's conv as the choice says)."""
    from resnet_fused import tuning

    monkeypatch.setenv("RESNET_FUSED_TUNING_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setenv("RESNET_FUSED_TUNING_BUDGET", "0.01")
    monkeypatch.setattr(tuning, "time_candidates", lambda calls, device, budget: {n: 0.0 if n == choice else 1.0 for n in calls})
    tuning.store.clear()
    fused, eager = _pair("basic")
    fused.eval(), eager.eval()
    fused.backend = "tune"
    x = activation((2, 8, 6, 6), torch.float32, CL)
    stages = []
    real = resnet_fused.nn.plan._conv_act_stage
    monkeypatch.setattr(resnet_fused.nn.plan, "_conv_act_stage", lambda *a: stages.append(a[-1]) or real(*a))
    try:
        _check(fused, eager, x, f"tuned ({choice})")  # tunes on the first call
        stages.clear()
        with torch.no_grad():
            ops = _outermost_ops(lambda: fused(x))
    finally:
        tuning.store.clear()
    assert ops == ["resnet_fused::conv_act_stage"] * 2, ops
    assert stages == [choice == "cpu-onednn"] * 4, stages  # fused_conv: oneDNN's post-ops, or not


def _small_resnet():
    torch.manual_seed(0)
    eager = randomize_bn(torchvision.models.resnet18(num_classes=10))
    return resnet_fused.fuse_(copy.deepcopy(eager)), eager


def test_a_fused_model_is_one_stage_op_per_conv():
    """fuse_'s conv -> BN -> act runs (FusedConvBNActHead: the stem here) run plans as the blocks do: a fused
    resnet18 dispatches one stage op per conv and nothing else of its own, in eval and in training; results, gradients,
    running statistics and num_batches_tracked are eager's."""
    fused, eager = _small_resnet()
    x = activation((2, 3, 32, 32), torch.float32, CL)
    convs = sum(isinstance(m, nn.Conv2d) for m in eager.modules())
    tail = ["aten::max_pool2d", "aten::adaptive_avg_pool2d", "aten::flatten", "aten::linear"]
    fused.eval(), eager.eval()
    with torch.no_grad():
        ops = _outermost_ops(lambda: fused(x))
        assert sorted(ops) == sorted(["resnet_fused::conv_act_stage"] * convs + tail), ops
        _check(fused, eager, x, "resnet18 eval")
    # training: deep-net numerics (a ReLU-sign flip hits eager and fused alike), so norm-based against a float64 twin
    exact = copy.deepcopy(eager).double()
    x = activation((4, 3, 64, 64), torch.float32, CL)
    for m in (fused, eager, exact):
        m.train()
    ops = _outermost_ops(lambda: fused(x))
    assert sorted(ops) == sorted(["resnet_fused::conv_bn_act_stage"] * convs + tail), ops
    for _ in range(2):  # the calls _outermost_ops made, so that every twin has counted three batches
        eager(x), exact(x.double())
    outs = [m(x.to(dtype)) for m, dtype in ((fused, torch.float32), (eager, torch.float32), (exact, torch.float64))]
    grad = torch.randn_like(outs[2])
    for out in outs:
        out.backward(grad.to(out.dtype))
    results = [[out, *(dict(m.named_parameters())[n].grad for n in ("conv1.weight", "bn1.weight", "layer4.1.conv2.weight"))]
               for m, out in zip((fused, eager, exact), outs)]
    for what, f, e, d in zip(("output", "conv1.weight.grad", "bn1.weight.grad", "layer4.1.conv2.weight.grad"), *results):
        assert rel_err(f, d) <= 2 * rel_err(e, d) + 1e-6, (what, rel_err(f, d), rel_err(e, d))
    for (k, a), b in zip(exact.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(b.to(a.dtype), a, rtol=1e-4, atol=1e-5, msg=k)


def test_heads_plans_are_not_state():
    """A head's plans are fuse_'s attribute: not in the state_dict, empty in a copy, gone after unfuse_."""
    fused, eager = _small_resnet()
    fused.eval()
    x = activation((1, 3, 32, 32), torch.float32, CL)
    with torch.no_grad():
        y = fused(x)
    assert len(plan_cache(fused.conv1)) == 1
    assert fused.state_dict().keys() == eager.state_dict().keys()
    twin = copy.deepcopy(fused)
    assert len(plan_cache(twin.conv1)) == 0
    with torch.no_grad():
        torch.testing.assert_close(twin(x), y)
    resnet_fused.unfuse_(fused)
    assert type(fused.conv1) is nn.Conv2d and "_resnet_fused_plans" not in fused.conv1.__dict__


def plan_cache(module):
    return module.__dict__["_resnet_fused_plans"]


@pytest.mark.parametrize("settings", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}],
                         ids=["default", "momentum_none", "no_affine", "no_running_stats"])
def test_fused_bn_act_is_one_bn_act_stage(settings):
    """FusedBNAct (a BN with no conv before it) runs one bn_act_stage call per forward, with nn.BatchNorm2d's
    semantics through train / eval switches: output, running statistics and num_batches_tracked eager's."""
    fused = resnet_fused.nn.FusedBNAct(6, act="relu", **settings)
    eager = nn.Sequential(nn.BatchNorm2d(6, **settings), nn.ReLU())
    if fused.weight is not None:
        with torch.no_grad():
            for m in (fused, eager[0]):
                m.weight.copy_(torch.linspace(0.5, 1.5, 6)), m.bias.copy_(torch.linspace(-0.2, 0.3, 6))
    x = activation((3, 6, 5, 5), torch.float32, CL)
    for i, mode in enumerate(["train", "train", "eval", "train", "eval"]):
        fused.train(mode == "train"), eager.train(mode == "train")
        xs = x * (i + 1) - i
        with torch.no_grad():
            ops = _outermost_ops(lambda: fused(xs)) if mode == "eval" else None
            torch.testing.assert_close(fused(xs), eager(xs), rtol=1e-5, atol=1e-5, msg=f"step {i} ({mode})")
            if ops is not None:  # (the profiled call counted the batch too: compare after a matched call in train)
                assert ops == ["resnet_fused::bn_act_stage"], ops
        for (k, a), b in zip(eager[0].state_dict().items(), fused.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"step {i} {k}")
    fused.train()
    assert _outermost_ops(lambda: fused(x)) == ["resnet_fused::bn_act_stage"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_fused_model_resolves_no_backend_per_call(training, monkeypatch):
    """Blocks, heads (the stem) and FusedBNAct decide their routing once: after the first call, a whole model's
    forward resolves no backend."""
    fused, _ = _small_resnet()
    model = nn.Sequential(fused, nn.Unflatten(1, (10, 1, 1)), resnet_fused.nn.FusedBNAct(10))
    model.train(training)
    x = activation((2, 3, 32, 32), torch.float32, CL)
    model(x)
    calls = _recorded_resolutions(monkeypatch)
    model(x)
    assert calls == [], f"{len(calls)} resolutions"


def test_frozen_batchnorm_backbone_is_one_stage_op_per_conv():
    """torchvision's FrozenBatchNorm2d (detection backbones): its blocks and heads plan as eval-mode BNs, one stage op
    per conv in eval and in training (the frozen affine, no statistics); results and gradients eager's."""
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(norm_layer=torchvision.ops.misc.FrozenBatchNorm2d, num_classes=10)
    with torch.no_grad():
        for f in eager.modules():
            if isinstance(f, torchvision.ops.misc.FrozenBatchNorm2d):
                f.weight.uniform_(0.5, 1.5), f.bias.uniform_(-0.3, 0.3)
                f.running_mean.uniform_(-0.3, 0.3), f.running_var.uniform_(0.5, 1.5)
    fused = resnet_fused.fuse_(copy.deepcopy(eager))
    assert type(fused.layer2[0]).__name__ == "FusedFrozenBNBasicBlock"
    x = activation((2, 3, 32, 32), torch.float32, CL)
    convs = sum(isinstance(m, nn.Conv2d) for m in eager.modules())
    tail = ["aten::max_pool2d", "aten::adaptive_avg_pool2d", "aten::flatten", "aten::linear"]
    for training, stage in ((False, "resnet_fused::conv_act_stage"), (True, "resnet_fused::conv_bn_act_stage")):
        fused.train(training), eager.train(training)
        with torch.set_grad_enabled(training):
            ops = _outermost_ops(lambda: fused(x))
            assert sorted(ops) == sorted([stage] * convs + tail), (training, ops)
            out, ref = fused(x), eager(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(ref)
    out.backward(grad), ref.backward(grad)
    for name in ("conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.conv2.weight"):
        f, e = (dict(m.named_parameters())[name].grad for m in (fused, eager))
        torch.testing.assert_close(f, e, rtol=1e-3, atol=1e-4, msg=name)


# ---- bf16 inference on the CPU: oneDNN's fused convolution where it has its bf16 ISA ----


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("projection", [False, True], ids=["identity", "projection"])
@pytest.mark.parametrize("isa", [True, False], ids=["bf16-isa", "no-bf16-isa"])
def test_bf16_eval_block_takes_onednn_where_it_runs_bf16(kind, projection, isa, monkeypatch):
    """bf16 eval on the cpu backend: where oneDNN runs bf16 (onednn.runs) every folded stage is oneDNN's convolution
    with its post-ops on a prepacked weight, the bias in bf16; where not, aten's conv then our epilogue pass, with the
    plan holding the bias in fp32 (no conversion per call; the projection's conv has none). Either way within eager
    bf16's error of float64."""
    from resnet_fused.ops import onednn

    if isa and not onednn.runs(torch.bfloat16):
        pytest.skip("oneDNN has no bf16 ISA on this CPU, or ONEDNN_MAX_CPU_ISA caps it")
    if not isa:
        monkeypatch.setattr(onednn, "runs", lambda dtype: dtype == torch.float32)
    fused, eager = _pair(kind, projection)
    fused, eager = fused.eval().bfloat16(), eager.eval().bfloat16()
    x = activation((4, fused.conv1.in_channels, 32, 32), torch.bfloat16, CL)  # onednn.MIN_OUTPUT outputs per conv and up
    _check(fused, eager, x, f"{kind} bf16 eval")
    (chain,) = fused._plans._plans.values()
    assert len(chain.stages) == fused.num_convs + projection
    for s in chain.stages:
        assert s.weight.is_mkldnn == isa and s.args[-1] == isa  # prepacked, fused_conv
        if s.bias is not None:
            assert s.bias.dtype == (torch.bfloat16 if isa else torch.float32)


# ---- a tuner's Variant(pad_channels=True): the RGB stem on input and weight padded to 16-byte channel vectors ----


def test_padded_channels_rule():
    """cudnn.padded_channels: input channels up to a multiple of cuDNN's vector width in the compute dtype (8 in fp16 /
    bf16, 4 in fp32), grouped convs and fp64 as they are."""
    from resnet_fused.ops.cudnn import padded_channels

    assert [padded_channels(3, 1, d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)] == [8, 8, 4, 3]
    assert padded_channels(8, 1, torch.float16) == 8 and padded_channels(13, 1, torch.float16) == 16
    assert padded_channels(6, 3, torch.float16) == 6


def _plan_pads(m: FusedConvBNReLU) -> list[int]:
    # the zero channels each stage of the layer's plans appends (Folded plans sit in a Chain)
    stages = [s for p in m._plans._plans.values() for s in (p.stages if isinstance(p, resnet_fused.nn.plan.Chain) else [p])]
    return [s.pad for s in stages]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", [CL, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_stem_computes_the_unpadded_function(training, fmt, dtype):
    """A 7x7 / 2 stem (3 -> 16 channels) on its padded plan (cpu backend standing in for cuda): output, the gradients of
    the 3-channel input and weight, the BN parameters' gradients, running statistics and num_batches_tracked are
    eager's within the eager-error rule over two steps, then the folded plan's output in eval; every plan did pad."""
    from helpers import Trio

    torch.manual_seed(0)
    eager = randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU()))
    fused = FusedConvBNReLU(3, 16, 7, 2, 3, backend="cpu")
    fused.load_state_dict({k.replace("0.", "conv.").replace("1.", "bn."): v for k, v in eager.state_dict().items()})
    fused, eager = fused.to(dtype, memory_format=fmt), eager.to(dtype, memory_format=fmt)
    x = activation((2, 3, 15, 13), dtype, fmt)
    trio = Trio(fused, eager)
    with backends.use_variant(backends.Variant(pad_channels=True)):
        for step in range(2):
            trio.step(x + step, training, f"padded stem {dtype} {fmt} step {step}", fmt)
        fused.eval(), eager.eval()
        with torch.no_grad():  # the folded plan: its weight padded when the plan is made
            exact = copy.deepcopy(eager).double()(x.double())
            assert_within_eager_error(fused(x), eager(x), exact, f"padded stem {dtype} {fmt} folded", factor=3.0)
    assert set(_plan_pads(fused)) == {1 if dtype == torch.float32 else 5}, _plan_pads(fused)
    assert any(isinstance(p, resnet_fused.nn.plan.Chain) for p in fused._plans._plans.values())
    assert fused.conv.weight.grad.shape == (16, 3, 7, 7)


def test_padded_variant_leaves_other_layers_alone():
    """A layer whose convs need no padding (8 input channels, a grouped conv), and a block, plan no pad under the
    variant; the tuner offers cuda-padded only for layers it changes (tuning.pads_input)."""
    from resnet_fused import tuning

    x8, x6 = activation((1, 8, 6, 6), torch.float16, CL), activation((1, 6, 6, 6), torch.float16, CL)
    stem, grouped = FusedConvBNReLU(3, 8, 7, 2, 3), FusedConvBNReLU(6, 6, 3, padding=1, groups=3)
    assert tuning.pads_input(stem, x8[:, :3]) and not tuning.pads_input(grouped, x6)
    assert not tuning.pads_input(FusedConvBNReLU(8, 8, 3), x8) and not tuning.pads_input(FusedBasicBlock(3, 8), x8[:, :3])
    m = FusedConvBNReLU(8, 8, 3, padding=1, backend="cpu").eval()
    with backends.use_variant(backends.Variant(pad_channels=True)), torch.no_grad():
        m(activation((1, 8, 6, 6), torch.float32, CL))
    assert _plan_pads(m) == [0]


def test_cuda_padded_is_a_candidate_where_it_pads(monkeypatch):
    """tuning.candidates: cuda-padded joins the CUDA candidates in inference and training only for a layer it pads."""
    from resnet_fused import tuning

    monkeypatch.setattr(backends, "available", lambda: {"cpu": True, "cuda": True, "triton": False, "torch": True})
    gpu = torch.device("cuda")
    for training, backward in ((False, False), (True, True)):
        names = [c.name for c in tuning.candidates(gpu, training, backward, pads=True)]
        assert names[0] == "eager" and names[-1] == "cuda-padded", names
        assert "cuda-padded" not in [c.name for c in tuning.candidates(gpu, training, backward)]
    assert "cuda-padded" not in [c.name for c in tuning.candidates(torch.device("cpu"), False, False, pads=True)]


@needs_extension
def test_plan_follows_a_replaced_downsample_child():
    """Swapping a module inside the block's downsample Sequential (a user's swap, convert_sync_batchnorm) makes a new
    plan: the block then computes with the new BN, as eager does."""
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    block = resnet_fused.fuse_(torchvision.models.resnet.BasicBlock(8, 16, 2, ds).eval(), backend="cpu")
    x = activation((2, 8, 8, 8), torch.float32, CL)
    with torch.no_grad():
        block(x)
        new = randomize_bn(nn.BatchNorm2d(16)).eval()
        block.downsample[1] = new
        got, want = block(x), block._run_eager(x)
    assert_within_eager_error(got, want, block.double()._run_eager(x.double()).float(), "after the swap")


@needs_extension
def test_fold_made_under_inference_mode_serves_a_grad_call():
    """A fold first made under torch.inference_mode() is a plain tensor: a later eval call whose input needs grad
    (saliency maps, adversarial inputs) through frozen parameters saves it for backward, as eager does."""
    block = resnet_fused.fuse_(torchvision.models.resnet.BasicBlock(8, 8).eval(), backend="cpu")
    for p in block.parameters():
        p.requires_grad_(False)
    x = activation((2, 8, 6, 6), torch.float32, CL)
    with torch.inference_mode():
        block(x)
    leaf = x.clone().requires_grad_()
    block(leaf).sum().backward()
    eager_leaf = x.clone().requires_grad_()
    block._run_eager(eager_leaf).sum().backward()
    torch.testing.assert_close(leaf.grad, eager_leaf.grad, rtol=1e-4, atol=1e-5)
