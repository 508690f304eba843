"""The backend setting "tune" (resnet_fused.tuning): measured choice per layer and signature, with no
side effect on the real call, a cache that is reused, and a cache file that survives the process."""

import copy
import json
import logging

import pytest
import torch
from torch import nn

import resnet_fused
from resnet_fused import backends, tuning
from resnet_fused.nn import FusedBasicBlock, FusedBottleneck, FusedConvBNReLU
from resnet_fused.bench.blocks import tuned_choice
from helpers import CL, activation, needs_extension

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not backends.available()["cpu"], reason="resnet_fused._C is not built")),
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@pytest.fixture(autouse=True)
def cache_file(tmp_path, monkeypatch):
    """A fresh cache file per test, and a short budget (the choice is not what these tests check)."""
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("RESNET_FUSED_TUNING_CACHE", str(path))
    monkeypatch.setenv("RESNET_FUSED_TUNING_BUDGET", "0.01")
    tuning.store.clear()
    yield path
    tuning.store.clear()


@pytest.fixture
def timings(monkeypatch):
    """Count the timing runs, and make the candidate named in `prefer[0]` (if any) the fastest."""
    seen, prefer = [], []
    real = tuning.time_candidates

    def fake(calls, device, budget):
        seen.append(sorted(calls))
        ms = real(calls, device, budget)
        return {n: (0.0 if prefer and n == prefer[0] else t + 1.0) for n, t in ms.items()}

    monkeypatch.setattr(tuning, "time_candidates", fake)
    return seen, prefer


def _block(kind, device):
    torch.manual_seed(1)
    if kind == "basic":
        ds = nn.Sequential(nn.Conv2d(16, 24, 1, 2, bias=False), nn.BatchNorm2d(24))
        m = FusedBasicBlock(16, 24, 2, ds)
    elif kind == "bottleneck":
        m = FusedBottleneck(24, 6)
    else:
        m = FusedConvBNReLU(16, 24, 3, 1, 1)
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):  # away from (0, 1)
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    return m.to(device).to(memory_format=CL)


def _input(kind, device):
    return activation((3, 24 if kind == "bottleneck" else 16, 10, 10), torch.float32, CL, device)


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["basic", "bottleneck", "convbnrelu"])
@pytest.mark.parametrize("choice", ["eager", "fused"])
def test_tuned_training_step_has_no_side_effects(kind, device, choice, timings):
    """One tuned training step equals one untuned step: outputs, gradients, running statistics,
    num_batches_tracked, parameters and the RNG state, whichever candidate wins."""
    seen, prefer = timings
    prefer.append("eager" if choice == "eager" else ("cpu" if device == "cpu" else "cuda"))
    tuned, plain = _block(kind, device), _block(kind, device)
    x = _input(kind, device)
    before = _state(plain)
    rng = torch.get_rng_state()

    xt, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    with backends.use("tune"):
        out_t = tuned(xt)
    assert torch.equal(torch.get_rng_state(), rng), "tuning moved the CPU RNG"
    assert seen, "the first call of a new signature was not tuned"
    assert [c.name for c in tuned._tuned_choices.values()] == [prefer[0]], tuned._tuned_choices
    # the untuned step runs the chosen candidate itself: the same arithmetic, so the same bits
    out_p = plain._run_eager(xp) if prefer[0] == "eager" else plain._run_fused(xp, prefer[0])
    g = torch.randn_like(out_p)
    out_t.backward(g), out_p.backward(g)

    same = dict(rtol=0, atol=0)
    torch.testing.assert_close(out_t, out_p, **same)
    torch.testing.assert_close(xt.grad, xp.grad, **same)
    for (n, p_t), (_, p_p) in zip(tuned.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p_t.grad, p_p.grad, **same, msg=lambda m: f"grad of {n}: {m}")
    after_t, after_p = _state(tuned), _state(plain)
    for k in before:
        torch.testing.assert_close(after_t[k], after_p[k], **same, msg=lambda m: f"{k}: {m}")
        if k.endswith("num_batches_tracked"):
            assert after_t[k].item() == before[k].item() + 1, f"{k} moved {after_t[k].item() - before[k].item()} times"


@pytest.mark.parametrize("device", DEVICES)
def test_choice_is_cached_per_signature_and_reused(device, timings, cache_file):
    seen, _ = timings
    m = _block("basic", device).eval()
    x = _input("basic", device)
    with backends.use("tune"), torch.no_grad():
        m(x), m(x), m(x.clone())
        assert len(seen) == 1, f"tuned {len(seen)} times for one signature"
        m(activation((5, 16, 10, 10), torch.float32, CL, device))  # a new batch size: a new signature
        assert len(seen) == 2
        copy.deepcopy(m)(x)  # another layer, same signature: the store's choice, no timing
        assert len(seen) == 2
    m.train()
    with backends.use("tune"):
        m(x.clone().requires_grad_())  # training + backward: a new signature
    assert len(seen) == 3
    data = json.loads(cache_file.read_text())
    assert data["format"] == tuning.CACHE_FORMAT and len(data["choices"]) == 3
    assert all(set(e) >= {"choice", "ms", "tuning_s"} for e in data["choices"].values())


def test_cache_file_survives_the_process(timings, cache_file):
    """A second process (simulated: the in-memory store dropped, a new layer object) reads the file and
    does not tune again; it takes the recorded choice."""
    seen, prefer = timings
    prefer.append("eager")
    m, x = _block("bottleneck", "cpu").eval(), _input("bottleneck", "cpu")
    with backends.use("tune"), torch.no_grad():
        m(x)
    assert len(seen) == 1
    tuning.store.clear()
    fresh = _block("bottleneck", "cpu").eval()
    calls = []
    fresh._run_eager = lambda x: calls.append(1) or FusedBottleneck._run_eager(fresh, x)
    with backends.use("tune"), torch.no_grad():
        fresh(x)
    assert len(seen) == 1, "re-tuned although the cache file had the choice"
    assert calls == [1], "the recorded choice (eager) was not the one that ran"
    assert "eager" in resnet_fused.tuning_report()


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 999, "choices": {}}), json.dumps([1, 2])])
def test_corrupt_or_stale_cache_file_is_ignored_with_a_warning(content, cache_file, timings):
    seen, _ = timings
    cache_file.write_text(content)
    m, x = _block("convbnrelu", "cpu").eval(), _input("convbnrelu", "cpu")
    with pytest.warns(UserWarning, match="ignoring the tuning cache"), backends.use("tune"), torch.no_grad():
        out = m(x)
    assert len(seen) == 1 and out.shape == (3, 24, 10, 10)
    assert json.loads(cache_file.read_text())["format"] == tuning.CACHE_FORMAT  # rewritten whole


def test_choice_is_logged(timings, caplog):
    m, x = _block("convbnrelu", "cpu").eval(), _input("convbnrelu", "cpu")
    with caplog.at_level(logging.INFO, logger="resnet_fused"), backends.use("tune"), torch.no_grad():
        m(x)
    assert any("resnet_fused tuning:" in r.message and " ms" in r.message for r in caplog.records)


def test_no_cache_file_when_turned_off(monkeypatch, tmp_path, timings):
    monkeypatch.setenv("RESNET_FUSED_TUNING_CACHE", "off")
    m, x = _block("convbnrelu", "cpu").eval(), _input("convbnrelu", "cpu")
    with backends.use("tune"), torch.no_grad():
        m(x)
    assert not list(tmp_path.iterdir())


def test_inference_mode_and_per_module_backend(timings):
    seen, _ = timings
    m, x = _block("basic", "cpu").eval(), _input("basic", "cpu")
    m.backend = "tune"  # per module, with the global setting left at "auto"
    with torch.inference_mode():
        out = m(x)
    assert len(seen) == 1
    choice = next(iter(m._tuned_choices.values())).name
    with torch.no_grad():  # the chosen candidate, run untuned: the same bits
        torch.testing.assert_close(out, m._run_eager(x) if choice == "eager" else m._run_fused(x, choice), rtol=0, atol=0)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_compile_uses_the_choice_and_does_not_tune(training, timings):
    seen, prefer = timings
    prefer.append("eager")
    m, x = _block("bottleneck", "cpu").train(training), _input("bottleneck", "cpu")
    with backends.use("tune"):
        m(x.clone().requires_grad_(training))  # tunes, eagerly
        assert len(seen) == 1
        calls = []
        compiled = torch.compile(m, fullgraph=True)
        m._run_eager = lambda x: calls.append(1) or FusedBottleneck._run_eager(m, x)
        out = compiled(x.clone().requires_grad_(training))
        fresh = torch.compile(_block("bottleneck", "cpu").train(training), fullgraph=True)
        fresh(x.clone().requires_grad_(training))  # no choice yet: the rules, no timing while tracing
    assert len(seen) == 1
    assert calls, "the compiled layer did not trace the chosen (eager) implementation"
    assert out.shape == x.shape


@needs_extension
def test_a_candidate_that_fails_is_left_out(monkeypatch, timings, caplog):
    seen, _ = timings
    m, x = _block("convbnrelu", "cpu").eval(), _input("convbnrelu", "cpu")

    real = FusedConvBNReLU._planned

    def broken(self, x, backend, residual=None):  # the fused candidates (backend "cpu"), not the layer's own call
        if backend == "cpu":
            raise RuntimeError("no kernel for this shape")
        return real(self, x, backend, residual)
    monkeypatch.setattr(FusedConvBNReLU, "_planned", broken)  # how the tuner runs a fused candidate
    with caplog.at_level(logging.WARNING, logger="resnet_fused"), backends.use("tune"), torch.no_grad():
        out = m(x)
    assert seen == [["eager"]], seen
    assert any("cannot run" in r.message for r in caplog.records)
    torch.testing.assert_close(out, m._run_eager(x))


def test_synchronized_bn_is_not_tuned(timings):
    seen, _ = timings
    m, x = _block("basic", "cpu"), _input("basic", "cpu")
    m.process_group = object()  # any group: ranks must agree, so the rules apply
    with backends.use("tune"):
        m.eval()
        with torch.no_grad():
            m(x)
    assert not seen


def test_candidates_per_device_and_mode():
    names = lambda *a: [c.name for c in tuning.candidates(*a)]  # noqa: E731
    cpu = torch.device("cpu")
    if backends.available()["cpu"]:
        assert names(cpu, False, False) == ["eager", "cpu-onednn", "cpu-aten"]
        assert names(cpu, True, True) == ["eager", "cpu"]
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        inference, training = names(gpu, False, False), names(gpu, True, True)
        assert inference[0] == training[0] == "eager"
        if backends.available()["cuda"]:
            assert {"cuda-cudnn-fused", "cuda"} <= set(inference) and "cuda" in training
        if backends.available()["triton"]:
            assert "triton" in inference and {"triton", "triton-defer"} <= set(training)


@needs_extension
@pytest.mark.parametrize("fused_ms,expected", [(9.7, "eager"), (9.0, "cpu")])
def test_fused_must_beat_eager_by_the_margin_in_training(monkeypatch, fused_ms, expected):
    """Eager 10 ms: a fused candidate 3 % faster is within noise (eager stays), 10 % faster wins."""
    monkeypatch.setattr(tuning, "time_candidates",
                        lambda calls, device, budget: {n: {"eager": 10.0, "cpu": fused_ms}.get(n, 20.0) for n in calls})
    m, x = _block("convbnrelu", "cpu").train(), _input("convbnrelu", "cpu").requires_grad_()
    with backends.use("tune"):
        m(x).sum().backward()
    assert [c.name for c in m._tuned_choices.values()] == [expected]
    wrapped = nn.Sequential(m)  # the bench's "tuned" rows name each tuned layer's choice
    assert tuning.choices(wrapped) == {"0": [expected]}
    assert tuning.timings(wrapped) == {"0": [{"eager": 10.0, "cpu": fused_ms}]}
    assert tuned_choice(wrapped) == f"0: {expected} [cpu {fused_ms:.3f} eager 10.000 ms]"


@needs_extension
@pytest.mark.parametrize("fused_ms,expected", [(10.1, "eager"), (9.7, "cpu-onednn")])
def test_cpu_inference_takes_the_fastest(monkeypatch, fused_ms, expected):
    """CPU inference has no margin: the fused outputs' arena helps inside a model, where an isolated
    timing cannot see it (tuning._margin)."""
    monkeypatch.setattr(tuning, "time_candidates",
                        lambda calls, device, budget: {n: {"eager": 10.0, "cpu-onednn": fused_ms}.get(n, 20.0) for n in calls})
    m, x = _block("convbnrelu", "cpu").eval(), _input("convbnrelu", "cpu")
    with backends.use("tune"), torch.no_grad():
        m(x)
    assert [c.name for c in m._tuned_choices.values()] == [expected]
