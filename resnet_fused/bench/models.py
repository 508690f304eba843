"""The `models` suite: torchvision resnet18 / resnet50, inference images/s (eval, no grad) and training
images/s (forward, backward, SGD step), every provider timed in the same alternating rounds (CPU):

  eager-nchw, eager        the eager model, NCHW and channels_last
  fused-<backend>, tuned   fuse_(model) (channels_last), by the rules and by measurement
  compile-<mode>           torch.compile(model); on the CPU with --compile: also compile-freezing (eval:
                           Inductor's freezing, weights folded and prepacked) and compile-fused
                           (torch.compile(fuse_(model)): our ops must not slow a compiled graph)
  ort, openvino            CPU eval, when installed (the `anchors` extra): ONNX Runtime and OpenVINO,
                           checked against eager before timing; in bf16 OpenVINO alone (anchors.runs)
"""

from __future__ import annotations

import torch
import torchvision

import resnet_fused
from resnet_fused.bench import anchors
from resnet_fused.bench.blocks import prepare, providers as block_providers, tuned_counts
from resnet_fused.bench.timing import first_call_s, fresh_compile_cache, peak_memory, time_cpu_interleaved, time_cuda


def providers(device: torch.device, compile_modes: list[str], training: bool) -> list[str]:
    names = block_providers(device, compile_modes)
    if device.type != "cpu":
        return names
    extra = ["eager-nchw"]
    if compile_modes:
        extra += ([] if training else ["compile-freezing"]) + ["compile-fused"]
    if not training:
        extra += anchors.available()
    return [names[0], *extra, *names[1:]]


def _model(name: str, provider: str, device, dtype):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    if provider == "eager-nchw":
        return model.to(device, dtype)
    if provider == "compile-freezing":
        return torch.compile(model.to(device, dtype, memory_format=torch.channels_last), options={"freezing": True})
    if provider == "compile-fused":
        model = resnet_fused.fuse_(model.to(device, dtype, memory_format=torch.channels_last), backend="auto")
        return torch.compile(model)
    if provider in ("ort", "openvino"):
        return model.to(device)  # exported in fp32; the engine computes in the row's dtype
    return prepare(model, provider, device, dtype)


def _step(provider: str, model, x, labels, training: bool):
    if provider == "eager-nchw":
        x = x.contiguous()
    if not training:
        if provider in ("ort", "openvino"):
            return anchors.runner(provider, model, x.float().contiguous(), x.dtype)
        model.eval()

        def infer():
            with torch.no_grad():
                return model(x)
        return infer
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train():
        loss = torch.nn.functional.cross_entropy(model(x).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return train


def run(names, batches, resolution: int, dtypes, device: torch.device, compile_modes, quick: bool, rec) -> None:
    for name in names:
        for batch in batches:
            for dtype in dtypes:
                for training in (False, True):
                    fields = dict(suite="models", case=name, shape=f"{batch}x3x{resolution}x{resolution}",
                                  dtype=str(dtype).removeprefix("torch."), mode="training" if training else "inference")
                    names_ = _providers_in(dtype, providers(device, compile_modes, training))
                    with rec.case(fields, names_) as c:
                        x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=dtype)
                        x = x.contiguous(memory_format=torch.channels_last)
                        labels = torch.randint(0, 1000, (batch,), device=device)
                        fresh_compile_cache()
                        models_ = c.each(lambda p: _model(name, p, device, dtype))
                        steps = c.each(lambda p: _step(p, models_[p], x, labels, training))
                        first_s = c.each(lambda p: first_call_s(steps[p], device),
                                         among=[p for p in names_ if p == "tuned" or p.startswith("compile")])
                        if device.type == "cuda":
                            timings = c.each(lambda p: time_cuda([steps[p]], warmup=5, reps=20))
                            mem = c.each(lambda p: peak_memory(steps[p], device))
                        else:
                            c.each(lambda p: steps[p](), among=[p for p in names_ if p not in first_s])
                            timings = time_cpu_interleaved({p: steps[p] for p in c.live}, 1.0 if quick else 4.0)
                            mem = {}
                        for p, t in timings.items():
                            c.result(p, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs,
                                     images_per_s=batch / t.median_ms * 1e3, peak_mem_mb=mem.get(p),
                                     **({"tuning_s": first_s[p], "tuned_choice": tuned_counts(models_[p])}
                                        if p == "tuned" else {}),
                                     **({"compile_s": first_s[p]} if p.startswith("compile") else {}))


def _providers_in(dtype: torch.dtype, names: list[str]) -> list[str]:
    return [p for p in names if p not in anchors.DTYPES or anchors.runs(p, dtype)]


def count(names, batches, dtypes, device, compile_modes) -> int:
    per_dtype = sum(len(_providers_in(dtype, providers(device, compile_modes, training)))
                    for training in (False, True) for dtype in dtypes)
    return len(names) * len(batches) * per_dtype
