"""The CPU inference engines a user would pick instead of PyTorch: ONNX Runtime and OpenVINO (the
optional ``anchors`` extra). Each takes the eager model, exported once (torch.onnx.export /
openvino.convert_model), runs fp32 on as many threads as torch uses, and is checked against eager
PyTorch before it is timed: an anchor that computes something else is an error, not a number."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import os
import tempfile
from collections.abc import Callable

import torch

ENGINES = ("onnxruntime", "openvino")


def available() -> list[str]:
    """The engines installed here, as provider names ("ort", "openvino")."""
    names = {"onnxruntime": "ort", "openvino": "openvino"}
    return [names[e] for e in ENGINES if importlib.util.find_spec(e) is not None]


def versions() -> dict[str, str]:
    out = {}
    for engine in ENGINES:
        if importlib.util.find_spec(engine) is not None:
            out[engine] = importlib.import_module(engine).__version__
    return out


def runner(provider: str, model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """A no-argument call running `model` (eval, fp32, CPU) on x with the engine `provider` names,
    after checking its output against eager PyTorch's (the float64 model's error bounds it)."""
    model = model.eval()
    if provider == "ort":
        run = _onnxruntime(model, x)
    elif provider == "openvino":
        run = _openvino(model, x)
    else:
        raise ValueError(f"unknown anchor {provider!r}; choose from {available()}")
    check_output(provider, torch.as_tensor(run()), model, x)
    return run


def _threads() -> int:
    return torch.get_num_threads()


def _onnxruntime(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    session, feed = ort_session(model, x)
    return lambda: session.run(None, feed)[0]


def ort_session(model: torch.nn.Module, x: torch.Tensor, profile_prefix: str | None = None):
    """(session, feed): an ONNX Runtime CPU session of `model` exported for x (torch.onnx.export; fp32,
    torch's thread count, every graph optimization), and its input. profile_prefix: the session's
    profiler on, writing there (benchmarks/cpu_breakdown.py)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], dynamo=True, external_data=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = _threads(), 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if profile_prefix is not None:
            options.enable_profiling, options.profile_file_prefix = True, profile_prefix
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])  # loads the file
    return session, {"x": x.contiguous().numpy()}


def _openvino(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    import openvino as ov

    with torch.no_grad():
        ov_model = ov.convert_model(model, example_input=x)
    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": _threads(),
                                                         "INFERENCE_PRECISION_HINT": "f32",
                                                         "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    feed = x.contiguous().numpy()
    return lambda: request.infer({0: feed})[compiled.output(0)]


def check_output(provider: str, y: torch.Tensor, model: torch.nn.Module, x: torch.Tensor) -> None:
    """The engine's output within 4x eager fp32's own error against float64 (plus fp32 resolution),
    else RuntimeError."""
    with torch.no_grad():
        eager = model(x)
        exact = copy.deepcopy(model).double()(x.double())
    err = (y.double() - exact).norm().item()
    eager_err = (eager.double() - exact).norm().item()
    bound = 4 * eager_err + torch.finfo(torch.float32).eps * exact.norm().item() * 4
    if not err <= bound:
        raise RuntimeError(f"{provider}: output differs from the model's ({err:.3g} from float64, eager fp32 {eager_err:.3g})")
