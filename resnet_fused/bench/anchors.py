"""The CPU inference engines a user would pick instead of PyTorch: ONNX Runtime and OpenVINO (the
optional ``anchors`` extra). Each takes the eager model, exported once (torch.onnx.export /
openvino.convert_model), runs on as many threads as torch uses, and is checked against eager
PyTorch before it is timed: an anchor that computes something else is an error, not a number. fp32 both;
bf16 OpenVINO alone (its bf16 inference precision, where this CPU has it; ONNX Runtime's CPU provider has
no bf16 convolution)."""

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


DTYPES = {"ort": (torch.float32,), "openvino": (torch.float32, torch.bfloat16)}  # provider -> what it computes in


def runs(provider: str, dtype: torch.dtype) -> bool:
    """Whether the engine `provider` names is an anchor for inference in `dtype`."""
    return dtype in DTYPES.get(provider, ())


def runner(provider: str, model: torch.nn.Module, x: torch.Tensor,
           dtype: torch.dtype = torch.float32) -> Callable[[], object]:
    """A no-argument call running `model` (eval, fp32 weights, CPU) on x (fp32) with the engine `provider` names,
    computing in `dtype`, after checking its output against eager PyTorch's in that dtype (the float64 model's error
    bounds it)."""
    model = model.eval()
    if not runs(provider, dtype):
        raise ValueError(f"no anchor {provider!r} in {dtype}; anchors: {available()}, dtypes {DTYPES}")
    run = _onnxruntime(model, x) if provider == "ort" else _openvino(model, x, dtype)
    check_output(provider, torch.as_tensor(run()), model, x, dtype)
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


def _openvino(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], object]:
    import openvino as ov

    with torch.no_grad():
        ov_model = ov.convert_model(model, example_input=x)
    precision = {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]
    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": _threads(),
                                                         "INFERENCE_PRECISION_HINT": precision,
                                                         "PERFORMANCE_HINT": "LATENCY"})
    got = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # an ov.Type
    if got != precision:  # a hint this CPU cannot take falls back without a word: a row in the wrong dtype
        raise RuntimeError(f"openvino: no {precision} inference on this CPU (compiled for {got})")
    request = compiled.create_infer_request()
    feed = x.contiguous().numpy()
    try:  # OpenVINO reads ONEDNN_MAX_CPU_ISA too: capped below its bf16 ISA, its bf16 kernels fail here
        request.infer({0: feed})
    except RuntimeError as e:
        last_line = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise RuntimeError(f"openvino: no {precision} inference on this CPU ({last_line})") from e
    return lambda: request.infer({0: feed})[compiled.output(0)]


def check_output(provider: str, y: torch.Tensor, model: torch.nn.Module, x: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> None:
    """The engine's output within 4x eager's own error against float64 in `dtype` (plus that dtype's resolution),
    else RuntimeError."""
    with torch.no_grad():
        eager = copy.deepcopy(model).to(dtype)(x.to(dtype))
        exact = copy.deepcopy(model).double()(x.double())
    err = (y.double() - exact).norm().item()
    eager_err = (eager.double() - exact).norm().item()
    bound = 4 * eager_err + torch.finfo(dtype).eps * exact.norm().item() * 4
    if not err <= bound:
        raise RuntimeError(f"{provider}: output differs from the model's ({err:.3g} from float64, eager "
                           f"{str(dtype).removeprefix('torch.')} {eager_err:.3g})")
