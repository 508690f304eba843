"""Measured dispatch, the backend setting ``"tune"``: each fused layer runs the fastest of its
implementations on this device.

The first time a fused layer (FusedBasicBlock, FusedBottleneck, FusedConvBNReLU) meets a new
signature (its configuration, train / eval, whether a backward follows, the input's shape, layout and
dtype, the device), every implementation that can run it here is timed, eager PyTorch included, and
the fastest is kept: in this process, and in a JSON file that later processes read (as
cudnn.benchmark, Triton's autotuner and TensorRT's tactic selection do). Later calls look the choice
up. A tuned layer is therefore never slower than eager beyond timing noise.

Timing leaves the real call alone: candidates run on deep copies of the layer (parameters, buffers,
running statistics, num_batches_tracked, fold caches) and detached copies of the inputs, under a
forked RNG, with their gradients returned by torch.autograd.grad instead of accumulated.

Not tuned here (a choice this layer already made is used, else the rules): under torch.compile, during
CUDA graph capture (timing would synchronize), with BN
statistics synchronized across ranks (every rank must take the same path), fp64. So tune with one
eager call (or step) before torch.compile or a CUDA graph capture: they then use the choice it made.

Environment:
  RESNET_FUSED_TUNING_CACHE   the JSON file (default $XDG_CACHE_HOME/resnet_fused/tuning.json, or
                              ~/.cache/resnet_fused/tuning.json); "off" keeps choices in memory only
  RESNET_FUSED_TUNING_BUDGET  seconds of timing per signature (default 1.0; at least MIN_ROUNDS rounds)
  RESNET_FUSED_TUNING_MARGIN  how much faster than eager a fused candidate must be to be chosen
                              (default 0.05: 5 %, about the run-to-run spread of a busy 2-core machine)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from resnet_fused import backends
from resnet_fused.activations import Activation
from resnet_fused.backends import RULES, Variant
from resnet_fused._layout import memory_format
from resnet_fused.ops import arena, cudnn

logger = logging.getLogger("resnet_fused")

MIN_ROUNDS, MAX_ROUNDS = 5, 200
CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    backend: str | None  # None: eager PyTorch, module by module
    variant: Variant = RULES


EAGER = Candidate("eager", None)


def candidates(device: torch.device, training: bool, backward: bool, pads: bool = False) -> list[Candidate]:
    """Every implementation of a fused layer that can run on `device` in this mode, eager first. pads: the layer has
    a conv whose input Variant(pad_channels=True) pads (pads_input), which adds the cuda-padded candidate (aten's
    NHWC conv of a 3-channel input runs far below its engines' rate: pytorch issue 68506, and the H200's bf16
    7x7 stem at 4 % of its matmul rate; padded to 8 channels the tensor-core and fused engines take it)."""
    avail = backends.available()
    inference = not (training or backward)
    found = [EAGER]
    if device.type == "cpu" and avail["cpu"]:
        found += ([Candidate("cpu-onednn", "cpu", Variant(onednn=True)), Candidate("cpu-aten", "cpu", Variant(onednn=False))]
                  if inference else [Candidate("cpu", "cpu")])
    if device.type == "cuda" and avail["cuda"]:
        found += ([Candidate("cuda-cudnn-fused", "cuda", Variant(cudnn_fused=True)),
                   Candidate("cuda", "cuda", Variant(cudnn_fused=False))] if inference
                  else [Candidate("cuda-defer", "cuda", Variant(defer=True)), Candidate("cuda", "cuda", Variant(defer=False))]
                  if training and cudnn.graphs_enabled() else [Candidate("cuda", "cuda")])
        found += [Candidate("cuda-padded", "cuda", Variant(pad_channels=True))] if pads else []
    if device.type == "cuda" and avail["triton"]:
        found += ([Candidate("triton-defer", "triton", Variant(defer=True)), Candidate("triton", "triton", Variant(defer=False))]
                  if training else [Candidate("triton", "triton")])
    return found


def pads_input(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether Variant(pad_channels=True) changes how `layer` runs on inputs like x: a layer planned as one conv -> BN
    stage (resnet_fused.nn.plan.conv_bn_plan: FusedConvBNAct's `conv`, or a FusedConvBNActHead, itself the conv) whose
    input channels cudnn.padded_channels rounds up."""
    conv = layer if isinstance(layer, nn.Conv2d) else getattr(layer, "conv", None)
    return isinstance(conv, nn.Conv2d) and cudnn.padded_channels(conv.in_channels, conv.groups, x.dtype) != conv.in_channels


# ---- what is remembered: signature -> choice ----


@functools.cache
def _versions() -> str:
    try:
        ours = importlib.metadata.version("resnet_fused")
    except importlib.metadata.PackageNotFoundError:
        ours = "dev"
    triton = importlib.metadata.version("triton") if backends.has_triton() else "none"
    return f"torch {torch.__version__}, triton {triton}, resnet_fused {ours}"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"


def _layer_config(layer: nn.Module) -> list:
    """What decides a layer's speed: its convolutions, its BN settings, its shortcut and activation."""
    act = getattr(layer, "act", None)
    config: list = [type(layer).__name__, getattr(layer, "shortcut", None), str(act) if isinstance(act, Activation) else None]
    for name, m in layer.named_modules():
        if isinstance(m, nn.Conv2d):
            config.append([name, list(m.weight.shape), list(m.stride), list(m.padding), list(m.dilation), m.groups,
                           m.bias is not None])
        elif isinstance(m, nn.BatchNorm2d):
            config.append([name, m.affine, m.track_running_stats])
    return config


def signature(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, training: bool, backward: bool) -> str:
    mode = ("train" if training else "eval") + ("+backward" if backward else "")
    autocast = str(torch.get_autocast_dtype(x.device.type)) if torch.is_autocast_enabled(x.device.type) else None
    tensors = [[list(t.shape), str(t.dtype).removeprefix("torch."), str(memory_format(t)).removeprefix("torch.")]
               for t in (x, residual) if t is not None]
    # the cuDNN graphs' switch changes the candidates (cuda-defer) and what "cuda" runs
    graphs = x.is_cuda and cudnn.graphs_enabled()
    return json.dumps([_device_name(x.device), _versions(), mode, autocast, tensors, _layer_config(layer)]
                      + (["cudnn-graphs"] if graphs else []))


class _Store:
    """Choices by signature, in memory and in the JSON file (read once, merged on every write)."""

    def __init__(self):
        self.entries: dict[str, dict] = {}
        self.loaded = False
        self.lock = threading.Lock()

    @staticmethod
    def path() -> str | None:
        env = os.environ.get("RESNET_FUSED_TUNING_CACHE")
        if env is not None:
            return None if env in ("", "off") else env
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(root, "resnet_fused", "tuning.json")

    @classmethod
    def read_file(cls) -> dict[str, dict]:
        path = cls.path()
        if path is None or not os.path.exists(path):
            return {}
        try:
            with open(path) as f:
                data = json.load(f)
            if data.get("format") != CACHE_FORMAT or not isinstance(data.get("choices"), dict):
                raise ValueError(f"format {data.get('format')!r}, expected {CACHE_FORMAT}")
            return {k: v for k, v in data["choices"].items() if isinstance(v, dict) and isinstance(v.get("choice"), str)}
        except (OSError, ValueError, AttributeError) as e:
            warnings.warn(f"resnet_fused: ignoring the tuning cache {path} ({e}); layers will be tuned again", stacklevel=4)
            return {}

    def _load(self) -> None:  # under self.lock
        if not self.loaded:
            self.entries = {**self.read_file(), **self.entries}
            self.loaded = True

    def get(self, key: str) -> dict | None:
        with self.lock:
            self._load()
            return self.entries.get(key)

    def all(self) -> dict[str, dict]:
        with self.lock:
            self._load()
            return dict(self.entries)

    def put(self, key: str, entry: dict) -> None:
        with self.lock:
            self.entries[key] = entry
            path = self.path()
            if path is None:
                return
            try:  # merge with what other processes wrote since, then replace the file atomically
                merged = {**self.read_file(), **self.entries}
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path) or ".", delete=False, suffix=".tmp") as f:
                    json.dump({"format": CACHE_FORMAT, "choices": merged}, f, indent=1)
                os.replace(f.name, path)
            except OSError as e:
                warnings.warn(f"resnet_fused: could not write the tuning cache {path} ({e}); choices stay in memory",
                              stacklevel=4)

    def clear(self) -> None:
        """Forget this process's choices and re-read the file at the next lookup (layers keep the
        choices they already looked up)."""
        with self.lock:
            self.entries, self.loaded = {}, False


store = _Store()


def report() -> str:
    """One line per signature seen by this process or found in the cache file: the choice and the times."""
    lines = []
    for key, e in sorted(store.all().items()):
        times = ", ".join(f"{n} {ms:.3f} ms" for n, ms in sorted(e.get("ms", {}).items(), key=lambda kv: kv[1]))
        lines.append(f"{e['choice']:<18} {key}  [{times}; tuned in {e.get('tuning_s', 0):.2f} s]")
    return "\n".join(lines) or "no tuned layers yet"


def choices(model: nn.Module) -> dict[str, list[str]]:
    """What the tuner chose for each tuned layer of `model` (the model itself included), by module name: one
    candidate name per input signature it has met ("rules" where a choice from another build fell back to them)."""
    return {name: [c.name if c is not None else "rules" for c in m.__dict__["_tuned_choices"].values()]
            for name, m in model.named_modules() if m.__dict__.get("_tuned_choices")}


def timings(model: nn.Module) -> dict[str, list[dict[str, float]]]:
    """The candidates' median milliseconds behind each choice of choices(model), in the same order (as tuned, or as
    read from the cache file)."""
    return {name: list(m.__dict__["_tuned_ms"].values()) for name, m in model.named_modules() if m.__dict__.get("_tuned_ms")}


# ---- the call ----


def run(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """layer(x[, residual]) through its tuned implementation (tuning first if this signature is new)."""
    extra = () if residual is None else (residual,)
    if getattr(layer, "process_group", None) is not None:
        return layer._run_fused(x, None, *extra)
    training = layer.training
    backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, residual, *layer.parameters()))
    # per layer, a cheap key first: the full signature costs a few hundred microseconds of Python, and
    # torch.compile can trace this lookup (the shapes are constants there) but not the signature
    autocast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    fast = (x.device, training, backward, autocast, cudnn.graphs_enabled(),
            *((tuple(t.shape), tuple(t.stride()), t.dtype) for t in (x, residual) if t is not None))
    seen: dict = layer.__dict__.setdefault("_tuned_choices", {})  # fast key -> Candidate (None: the rules)
    if fast in seen or torch.compiler.is_compiling():
        chosen = seen.get(fast)
    else:
        key = signature(layer, x, residual, training, backward)
        entry = store.get(key)
        if entry is None and x.is_cuda and torch.cuda.is_current_stream_capturing():  # no timing inside a capture
            return layer._run_fused(x, None, *extra)
        name = entry["choice"] if entry is not None else _tune(layer, x, residual, key, training, backward)
        layer.__dict__.setdefault("_tuned_ms", {})[fast] = (entry or store.get(key) or {}).get("ms", {})
        # a choice this machine cannot run (another build in the same cache slot): the rules
        chosen = seen[fast] = next((c for c in candidates(x.device, training, backward, pads_input(layer, x))
                                    if c.name == name), None)
    if chosen is None:  # the rules ("auto")
        return layer._run_fused(x, "auto", *extra) if torch.compiler.is_compiling() else layer._planned(x, "auto", *extra)
    return _call(layer, chosen, x, extra)


def _call(layer: nn.Module, c: Candidate, x: torch.Tensor, extra: tuple) -> torch.Tensor:
    if c.backend is None:  # on the CPU in the arena, as a fused plan runs (timed as it runs in a model)
        with arena.scope(x):
            return layer._run_eager(x, *extra)
    if torch.compiler.is_compiling():  # a context variable cannot be set while tracing: the backend's rules
        return layer._run_fused(x, c.backend, *extra)
    with backends.use_variant(c.variant):  # the layer's plan for this candidate (resnet_fused/nn/plan.py)
        return layer._planned(x, c.backend, *extra)


def _tune(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, key: str, training: bool, backward: bool) -> str:
    start = time.perf_counter()
    budget = float(os.environ.get("RESNET_FUSED_TUNING_BUDGET", "1.0"))
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else [], device_type=x.device.type):
        calls = {}
        for c in candidates(x.device, training, backward, pads_input(layer, x)):
            try:
                calls[c.name] = _timed_call(layer, c, x, residual, backward)
            except Exception as e:  # noqa: BLE001  (a candidate that cannot run this signature is left out)
                if c is EAGER:
                    raise
                logger.warning("resnet_fused tuning: %s cannot run %s: %s", c.name, key, e)
        ms = time_candidates(calls, x.device, budget)
    choice = min(ms, key=ms.get)
    if EAGER.name in ms and ms[choice] > ms[EAGER.name] * (1 - _margin(x, backward)):
        choice = EAGER.name
    entry = {"choice": choice, "ms": ms, "tuning_s": time.perf_counter() - start}
    store.put(key, entry)
    logger.info("resnet_fused tuning: %s for %s (%s; %.2f s)", choice, key,
                ", ".join(f"{n} {t:.3f} ms" for n, t in sorted(ms.items(), key=lambda kv: kv[1])), entry["tuning_s"])
    return choice


def _margin(x: torch.Tensor, backward: bool) -> float:
    """How much faster than eager a fused candidate must be to be chosen. On a busy machine medians move
    by several percent between runs, and a coin-flip win would risk a layer slower than eager
    (RESNET_FUSED_TUNING_MARGIN, default 5 %). Except CPU inference, measured when only the fused outputs
    came from the arena (resnet_fused/ops/arena.py) and an eager layer's page-faulted inside a model:
    resnet50 at batch 8 tuned with the margin ran 161-165 ms where the rules ran 155. The eager candidate
    now runs in the arena too (_call); the rule stays until that is measured again."""
    if x.device.type == "cpu" and not backward:
        return 0.0
    return float(os.environ.get("RESNET_FUSED_TUNING_MARGIN", "0.05"))


def _timed_call(layer: nn.Module, c: Candidate, x: torch.Tensor, residual: torch.Tensor | None,
                backward: bool) -> Callable[[], object]:
    """One call of candidate c on copies: forward, or forward + backward with one fixed random
    grad_output (gradients returned, not accumulated). Runs it once (warm-up, and proof it works)."""
    clone = copy.deepcopy(layer)
    xs, rs = (None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in (x, residual))
    extra = () if rs is None else (rs,)
    out = _call(clone, c, xs, extra)
    if not backward:
        return lambda: _call(clone, c, xs, extra)
    grad = torch.randn_like(out)
    wrt = [t for t in (xs, rs, *clone.parameters()) if t is not None and t.requires_grad]
    torch.autograd.grad(out, wrt, grad, allow_unused=True)

    def step():
        torch.autograd.grad(_call(clone, c, xs, extra), wrt, grad, allow_unused=True)
    return step


def time_candidates(calls: dict[str, Callable[[], object]], device: torch.device, budget_s: float) -> dict[str, float]:
    """Median milliseconds per call of each candidate, measured in alternating rounds (one sample of
    each per round, so a drift in the machine's speed is shared) until budget_s has passed, between
    MIN_ROUNDS and MAX_ROUNDS rounds. CUDA: events around each call; CPU: a wall clock around blocks of
    calls of at least ~2 ms."""
    for fn in calls.values():  # second warm-up: autotuners, allocator, caches
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    block = {}
    for name, fn in calls.items():
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        block[name] = 1 if cuda else max(1, int(2e-3 / max(time.perf_counter() - t0, 1e-7)))
    samples: dict[str, list] = {n: [] for n in calls}
    start, rounds = time.perf_counter(), 0
    while rounds < MIN_ROUNDS or (rounds < MAX_ROUNDS and time.perf_counter() - start < budget_s):
        for name, fn in calls.items():
            if cuda:
                ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ev[0].record()
                fn()
                ev[1].record()
                samples[name].append(ev)
            else:
                t0 = time.perf_counter()
                for _ in range(block[name]):
                    fn()
                samples[name].append((time.perf_counter() - t0) * 1e3 / block[name])
        if cuda:
            torch.cuda.synchronize(device)
        rounds += 1
    if cuda:
        samples = {n: [a.elapsed_time(b) for a, b in s] for n, s in samples.items()}
    return {n: statistics.median(s) for n, s in samples.items()}
