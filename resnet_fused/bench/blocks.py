"""The `blocks` suite: BasicBlock and Bottleneck at the ResNet-18 / ResNet-50 stage shapes, inference
(eval, no grad) and training (forward + backward); eager torchvision blocks vs fused (and
torch.compile where asked), in channels_last and the run's dtype."""

from __future__ import annotations

import collections

import torch
import torchvision

import resnet_fused
from resnet_fused import tuning
from resnet_fused.ops import cudnn
from resnet_fused.bench.timing import copies_exceeding_l2, first_call_s, fresh_compile_cache, peak_memory, time_cpu_interleaved, time_cuda

# (name, block class name, inplanes, planes, H): the identity blocks of each stage
RESNET18_STAGES = [("resnet18.layer1", "BasicBlock", 64, 64, 56), ("resnet18.layer2", "BasicBlock", 128, 128, 28),
                   ("resnet18.layer3", "BasicBlock", 256, 256, 14), ("resnet18.layer4", "BasicBlock", 512, 512, 7)]
RESNET50_STAGES = [("resnet50.layer1", "Bottleneck", 256, 64, 56), ("resnet50.layer2", "Bottleneck", 512, 128, 28),
                   ("resnet50.layer3", "Bottleneck", 1024, 256, 14), ("resnet50.layer4", "Bottleneck", 2048, 512, 7)]


# the cuda backend with the cuDNN graphs on (conv + genstats; fp16 blocks defer their inner BN + ReLU into the next
# conv's graph: csrc/cudnn/), where this build has them
CUDA_GRAPHS = "fused-cuda-cudnn-graphs"


def providers(device: torch.device, compile_modes: list[str]) -> list[str]:
    avail = resnet_fused.backends.available()
    fused = [f"fused-{b}" for b in (["cpu"] if device.type == "cpu" else ["cuda", "triton"]) if avail[b]]
    if "fused-cuda" in fused and cudnn.graphs_built():
        fused.insert(1, CUDA_GRAPHS)
    return ["eager", *[f"compile-{m}" for m in compile_modes], *fused, *(["tuned"] if fused else [])]


def scoped(provider: str, fn):
    """fn as `provider` runs it: with the cuDNN graphs on for CUDA_GRAPHS, off for every other provider."""
    def call():
        with cudnn.graphs(provider == CUDA_GRAPHS):
            return fn()
    return call if cudnn.graphs_built() else fn


def prepare(module: torch.nn.Module, provider: str, device, dtype) -> torch.nn.Module:
    """The eager module moved to device / dtype / channels_last, then as `provider` runs it: as it is
    ("eager"), fused in place ("fused-<backend>", or "tuned": backend "tune"), or compiled ("compile-<mode>")."""
    module = module.to(device, dtype, memory_format=torch.channels_last)
    if provider == CUDA_GRAPHS:
        resnet_fused.fuse_(module, backend="cuda")
    elif provider.startswith("fused-"):
        resnet_fused.fuse_(module, backend=provider.removeprefix("fused-"))
    elif provider == "tuned":
        resnet_fused.fuse_(module, backend="tune")
    elif provider.startswith("compile-"):
        mode = provider.removeprefix("compile-")
        module = torch.compile(module, mode=None if mode == "default" else mode)
    return module


def tuned_choice(module: torch.nn.Module) -> str:
    """The "tuned" provider's choices, for its row: "name: candidate [each candidate's ms]" per tuned layer and signature
    (resnet_fused.tuning.choices, timings)."""
    times = tuning.timings(module)
    return "; ".join(f"{name or '<layer>'}: " + ", ".join(
        f"{choice} [{' '.join(f'{c} {ms:.3f}' for c, ms in sorted(t.items(), key=lambda kv: kv[1]))} ms]"
        for choice, t in zip(names, times[name]))
        for name, names in tuning.choices(module).items())


def tuned_counts(model: torch.nn.Module) -> str:
    """A tuned model's choices, for its row: how many layer signatures took each candidate."""
    counts = collections.Counter(n for names in tuning.choices(model).values() for n in names)
    return ", ".join(f"{name} {k}" for name, k in counts.most_common())


def _block(kind: str, inplanes: int, planes: int, provider: str, device, dtype):
    torch.manual_seed(0)
    return prepare(getattr(torchvision.models.resnet, kind)(inplanes, planes), provider, device, dtype)


def step_fn(block, x, grad, training: bool):
    """One call of `block` on x: inference under no_grad, or training forward + backward of grad (x.grad cleared)."""
    if not training:
        def infer():
            with torch.no_grad():
                return block(x)
        return infer

    def train():
        out = block(x)
        out.backward(grad)
        x.grad = None
    return train


def run(stages, batch: int, dtypes, device: torch.device, compile_modes, quick: bool, rec) -> None:
    names = providers(device, compile_modes)
    for name, kind, inplanes, planes, hw in stages:
        for dtype in dtypes:
            for training in (False, True):
                shape = (batch, inplanes, hw, hw)
                fields = dict(suite="blocks", case=name, block=kind, shape="x".join(map(str, shape)),
                              dtype=str(dtype).removeprefix("torch."), mode="training" if training else "inference")

                def make(block):
                    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
                    return step_fn(block, x.requires_grad_(training), torch.randn_like(x), training)

                with rec.case(fields, names) as c:
                    fresh_compile_cache()
                    blocks_ = c.each(lambda p: _block(kind, inplanes, planes, p, device, dtype).train(training))
                    tuning_s = c.each(lambda p: first_call_s(make(blocks_[p]), device), among=["tuned"])
                    chosen = c.each(lambda p: tuned_choice(blocks_[p]), among=list(tuning_s))
                    if device.type == "cuda":
                        copies = copies_exceeding_l2(2 * x_bytes(shape, dtype), device)
                        fns = c.each(lambda p: [scoped(p, make(blocks_[p])) for _ in range(copies)])
                        timings = c.each(lambda p: time_cuda(fns[p]))
                        mem = c.each(lambda p: peak_memory(fns[p][0], device))
                    else:
                        calls = c.each(lambda p: make(blocks_[p]))
                        c.each(lambda p: calls[p]())
                        timings = time_cpu_interleaved({p: calls[p] for p in c.live}, 0.5 if quick else 2.0)
                        mem = {}
                    for p, t in timings.items():
                        c.result(p, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs,
                                 peak_mem_mb=mem.get(p),
                                 **({"tuning_s": tuning_s[p], "tuned_choice": chosen.get(p)} if p in tuning_s else {}))


def x_bytes(shape, dtype) -> int:
    n, c, h, w = shape
    return n * c * h * w * torch.finfo(dtype).bits // 8


def count(stages, dtypes, device, compile_modes) -> int:
    return len(stages) * len(dtypes) * 2 * len(providers(device, compile_modes))
