"""The `models` suite: torchvision resnet18 / resnet50, original vs fuse_(model) (and torch.compile
where asked): inference images/s (eval, no grad) and training images/s (forward, backward, SGD step)."""

from __future__ import annotations

import torch
import torchvision

from resnet_fused.bench.blocks import prepare, providers
from resnet_fused.bench.timing import first_call_s, fresh_compile_cache, peak_memory, time_cpu_interleaved, time_cuda


def _model(name: str, provider: str, device, dtype):
    torch.manual_seed(0)
    return prepare(getattr(torchvision.models, name)(), provider, device, dtype)


def _step(model, x, labels, training: bool):
    if not training:
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


def run(names, batches, resolution: int, dtypes, device: torch.device, compile_modes, quick: bool, progress) -> list[dict]:
    rows = []
    for name in names:
        for batch in batches:
            for dtype in dtypes:
                for training in (False, True):
                    x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=dtype)
                    x = x.contiguous(memory_format=torch.channels_last)
                    labels = torch.randint(0, 1000, (batch,), device=device)
                    names_ = providers(device, compile_modes)
                    fresh_compile_cache()
                    steps = {p: _step(_model(name, p, device, dtype), x, labels, training) for p in names_}
                    tuning_s = {p: first_call_s(s, device) for p, s in steps.items() if p == "tuned"}
                    if device.type == "cuda":
                        timings = {p: time_cuda([s], warmup=5, reps=20) for p, s in steps.items()}
                        mem = {p: peak_memory(s, device) for p, s in steps.items()}
                    else:
                        timings, mem = time_cpu_interleaved(steps, 1.0 if quick else 4.0), dict.fromkeys(names_)
                    eager_ms = timings["eager"].median_ms
                    for p in names_:
                        t = timings[p]
                        rows.append(dict(suite="models", case=name, shape=f"{batch}x3x{resolution}x{resolution}",
                                         dtype=str(dtype).removeprefix("torch."), mode="training" if training else "inference",
                                         provider=p, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs,
                                         images_per_s=batch / t.median_ms * 1e3, peak_mem_mb=mem[p],
                                         speedup_vs_eager=eager_ms / t.median_ms,
                                         **({"tuning_s": tuning_s[p]} if p in tuning_s else {})))
                        progress()
    return rows


def count(names, batches, dtypes, device, compile_modes) -> int:
    return len(names) * len(batches) * len(dtypes) * 2 * len(providers(device, compile_modes))
