"""The `models` suite: torchvision resnet18 / resnet50, original vs fuse_(model) (and torch.compile
where asked): inference images/s (eval, no grad) and training images/s (forward, backward, SGD step)."""

from __future__ import annotations

import torch
import torchvision

from resnet_fused.bench.blocks import prepare, providers
from resnet_fused.bench.timing import peak_memory, time_cpu, time_cuda


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
                    eager_ms = None
                    for provider in providers(device, compile_modes):
                        model = _model(name, provider, device, dtype)
                        x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=dtype)
                        x = x.contiguous(memory_format=torch.channels_last)
                        step = _step(model, x, torch.randint(0, 1000, (batch,), device=device), training)
                        if device.type == "cuda":
                            t, mem = time_cuda([step], warmup=5, reps=20), peak_memory(step, device)
                        else:
                            t, mem = time_cpu(step, 1.0 if quick else 4.0), None
                        eager_ms = t.median_ms if provider == "eager" else eager_ms
                        rows.append(dict(suite="models", case=name, shape=f"{batch}x3x{resolution}x{resolution}",
                                         dtype=str(dtype).removeprefix("torch."), mode="training" if training else "inference",
                                         provider=provider, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs,
                                         images_per_s=batch / t.median_ms * 1e3, peak_mem_mb=mem,
                                         speedup_vs_eager=eager_ms / t.median_ms))
                        progress()
    return rows


def count(names, batches, dtypes, device, compile_modes) -> int:
    return len(names) * len(batches) * len(dtypes) * 2 * len(providers(device, compile_modes))
