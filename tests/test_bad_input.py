"""Bad input raises an error that names the problem, at the public functions and at the C++ ops."""

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import resnet_fused
from resnet_fused import backends, functional

OPS = torch.ops.resnet_fused
needs_extension = pytest.mark.skipif(not backends.has_extension(), reason="resnet_fused._C is not built")


def _x(*shape, dtype=torch.float32):
    return torch.randn(shape or (2, 4, 3, 3)).to(dtype)


def _stats(C=4):
    return torch.zeros(C), torch.ones(C)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: functional.bn_act(torch.randn(2, 4, 3), *_stats()), ValueError, r"4-D \(N, C, H, W\).*\(2, 4, 3\)"),
        (lambda: functional.bn_act(_x(), *_stats(5)), ValueError, r"`running_mean` of shape \(4,\), one per channel of input \(2, 4, 3, 3\), got \(5,\)"),
        (lambda: functional.bn_act(_x(), *_stats(), weight=torch.ones(3)), ValueError, r"`weight` of shape \(4,\).*got \(3,\)"),
        (lambda: functional.bn_act(_x(dtype=torch.int32), *_stats()), TypeError, r"floating point, got torch.int32"),
        (lambda: functional.bn_act(_x(), *_stats(), residual=_x(2, 4, 3, 2)), ValueError,
         r"`residual` must match `input`: got \(2, 4, 3, 2\).*input is \(2, 4, 3, 3\)"),
        (lambda: functional.bn_act(_x(), *_stats(), residual=_x(dtype=torch.float16)), ValueError, r"torch.float16.*torch.float32"),
        (lambda: functional.bn_act(_x(), *_stats(), weight=torch.ones(4, device="meta")), ValueError,
         r"`weight` is on meta but `input` is on cpu"),
        (lambda: functional.bn_act(_x(), None, None, training=False), ValueError, r"must be given in evaluation mode"),
        (lambda: functional.bn_act(_x(), torch.zeros(4), None, training=True), ValueError, r"both running_mean and running_var"),
        (lambda: functional.bn_act(_x(), *_stats(), training=True, momentum=None), TypeError, r"1 / num_batches_tracked"),
        (lambda: functional.bn_act(_x(), *_stats(), backend="cuda"), RuntimeError, r"backend 'cuda' cannot run this call"),
        (lambda: functional.bn_act(_x(), *_stats(), backend="fastest"), ValueError, r"unknown backend 'fastest'"),
        (lambda: functional.add_relu(_x(), _x(2, 4, 3, 4)), ValueError, r"`residual` must match `input`"),
        (lambda: functional.add_relu(_x(dtype=torch.int64), _x(dtype=torch.int64)), TypeError, r"floating point, got torch.int64"),
        (lambda: functional.add_relu(_x(), "x"), TypeError, r"`residual` must be a Tensor, got str"),
        (lambda: functional.bn_act(_x(), *_stats(), bias=[0.0] * 4), TypeError, r"`bias` must be a Tensor or None, got list"),
        (lambda: functional.bn_act(_x(), *_stats(), weight=torch.ones(4, dtype=torch.float8_e4m3fn)), TypeError,
         r"`weight` to be float32, float64, float16 or bfloat16, got torch.float8_e4m3fn"),
    ],
)
def test_public_functions_reject_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


# (call, the error it must raise), evaluated with OPS, torch and _x in scope: as source text, so that a
# child process can run the same calls
CPP_BAD_CALLS = [
    ("OPS.bn_stats(torch.randn(4, 3))", r"bn_stats: expected `input` to be a 4-D \(N, C, H, W\) tensor, got shape \[4, 3\]"),
    ("OPS.bn_stats(_x(dtype=torch.float64))", r"float32, float16 or bfloat16, got Double"),
    ("OPS.add_relu_forward(_x(), _x(2, 4, 3, 2))",
     r"add_relu_forward: `residual` has shape \[2, 4, 3, 2\] but `input` has shape \[2, 4, 3, 3\]"),
    ("OPS.bn_act_apply(_x(), torch.ones(3), torch.ones(4), None, 'relu', 0.0)", r"`scale` of shape \[4\].*got shape \[3\]"),
    ("OPS.bn_act_apply(_x(), torch.ones(4, dtype=torch.float16), torch.ones(4), None, 'relu', 0.0)", r"`scale` to be float32, got Half"),
    ("OPS.bn_act_apply(_x(), torch.ones(4), torch.ones(4), _x(dtype=torch.bfloat16), 'relu', 0.0)",
     r"`residual` is BFloat16 but `input` is Float"),
    ("OPS.act_backward(_x(1, 4, 3, 3), _x(), torch.ones(4), torch.ones(4), None, 'silu', 0.0)",
     r"act_backward: `grad_out` has shape \[1, 4, 3, 3\] but `input` has shape \[2, 4, 3, 3\]"),
    ("OPS.act_backward(_x(), _x(), torch.ones(4), torch.ones(3), None, 'silu', 0.0)", r"`shift` of shape \[4\].*got shape \[3\]"),
    ("OPS.act_backward(_x(), _x(), torch.ones(4), torch.ones(4), None, 'swish', 0.0)", r"act_backward: unknown activation 'swish'"),
    ("OPS.bn_act_backward_reduce(_x(), _x(), torch.ones(4), _x(1, 4, 3, 3))", r"`output` has shape \[1, 4, 3, 3\]"),
    ("OPS.bn_act_backward_elemt(_x(), None, _x(), None, torch.ones(4), None, None, False)", r"given together"),
    ("OPS.bn_act_backward(_x(), _x(), torch.ones(3), torch.ones(4), None, None, 1e-5, True, True, True, False)",
     r"bn_act_backward: expected `mean` of shape \(4\), one per channel of input \[2, 4, 3, 3\], got \[3\]"),
    ("OPS.bn_scale_shift(torch.zeros(4), torch.ones(3), None, None, 1e-5)",
     r"bn_scale_shift: `var` has shape \[3\] but `mean` has shape \[4\]"),
    ("OPS.bn_scale_shift(torch.zeros(2, 2), torch.ones(4), None, None, 1e-5)",
     r"bn_scale_shift: expected `mean` to be a 1-D per-channel vector, got shape \[2, 2\]"),
    ("OPS.bn_scale_shift(torch.zeros(4), torch.ones(4), torch.ones(4, dtype=torch.int32), None, 1e-5)",
     r"bn_scale_shift: expected `weight` to be float32, float64, float16 or bfloat16, got Int"),
    ("OPS.bn_scale_shift(torch.zeros(4), torch.ones(4), None, torch.ones(5), 1e-5)",
     r"bn_scale_shift: `bias` has shape \[5\] but `mean` has shape \[4\]"),
    ("OPS.bn_backward_coeffs(torch.zeros(4), torch.zeros(5), torch.ones(4), None, 1e-5, 8.0, True)",
     r"bn_backward_coeffs: `sum_dy_xmu` has shape \[5\] but `sum_dy` has shape \[4\]"),
    ("OPS.bn_backward_coeffs(torch.zeros(4), torch.zeros(4), torch.ones(4), torch.ones(4, 1), 1e-5, 8.0, True)",
     r"bn_backward_coeffs: expected `weight` to be a 1-D per-channel vector, got shape \[4, 1\]"),
    ("OPS.bn_backward_coeffs(torch.zeros(4, dtype=torch.int64), torch.zeros(4), torch.ones(4), None, 1e-5, 8.0, True)",
     r"bn_backward_coeffs: expected `sum_dy` to be float32, float64, float16 or bfloat16, got Long"),
    ("OPS.conv_genstats(_x(), torch.randn(5, 3, 3, 3), [1, 1], [1, 1], [1, 1])",
     r"conv_genstats: expected `weight` of shape \(Cout, 4, KH, KW\) for `input` of shape \[2, 4, 3, 3\] \(groups 1\), "
     r"got \[5, 3, 3, 3\]"),
    ("OPS.conv_genstats(_x(), torch.randn(5, 4, 3, 3, dtype=torch.float64), [1, 1], [1, 1], [1, 1])",
     r"conv_genstats: `weight` is Double on cpu but `input` is Float on cpu"),
    # per-channel vectors in a dtype the kernels cannot read or write (a float8 running statistic would be written as fp32)
    ("OPS.bn_act_batch(_x(), None, None, None, 1e-5, 'relu', 0.0, None, None, torch.zeros(4, dtype=torch.float8_e4m3fn), "
     "torch.ones(4, dtype=torch.float8_e4m3fn), 0.1, None, None)",
     r"bn_act_batch: expected `running_mean` to be float32, float64, float16 or bfloat16, got Float8_e4m3fn"),
    ("OPS.bn_act_stage(_x(), torch.ones(4, dtype=torch.float8_e5m2), None, *_stats(), None, True, 0.1, None, 1e-5, 'relu', 0.0, None)",
     r"bn_act_stage: expected `weight` to be float32, float64, float16 or bfloat16, got Float8_e5m2"),
    ("OPS.bn_act_batch(_x(), None, None, None, 1e-5, 'relu', 0.0, None, None, *_stats(), None, torch.tensor(1), None)",
     r"bn_act_batch: expected `momentum_tensor` to be float32, float64, float16 or bfloat16, got Long"),
    ("OPS.bn_act_batch(_x(), None, None, None, 1e-5, 'relu', 0.0, torch.zeros(2), torch.ones(2), *_stats(), 0.1, None, None)",
     r"bn_act_batch: expected `batch_mean` of shape \(4\), one per channel of input \[2, 4, 3, 3\], got \[2\]"),
]


@needs_extension
@pytest.mark.parametrize("call,message", CPP_BAD_CALLS, ids=[f"{i}-{call.split('(')[0][4:]}" for i, (call, _) in
                                                            enumerate(CPP_BAD_CALLS)])
def test_cpp_ops_reject_bad_input(call, message):
    with pytest.raises(RuntimeError, match=message):
        eval(call, {"OPS": OPS, "torch": torch, "_x": _x, "_stats": _stats})


@needs_extension
@pytest.mark.parametrize("bad", ["batch_mean", "residual", "act", "running_dtype"])
def test_training_stage_moves_no_state_before_its_checks_pass(bad):
    """bn_act_batch rejects its input before the running statistics or num_batches_tracked move, and writes nothing
    past a running statistic it cannot hold (the bytes beside a float8 view stay as they were)."""
    x, C = _x(), 4
    dtype = torch.float8_e4m3fn if bad == "running_dtype" else torch.float32
    base_mean, base_var = torch.full((3 * C,), 0.25).to(dtype), torch.full((3 * C,), 2.0).to(dtype)
    running_mean, running_var, counter = base_mean[C:2 * C], base_var[C:2 * C], torch.tensor(5)
    before = (base_mean.float().clone(), base_var.float().clone())
    args = dict(residual=_x(2, 4, 3, 2) if bad == "residual" else None, act="swish" if bad == "act" else "relu",
                batch_mean=torch.zeros(C - 1) if bad == "batch_mean" else None,
                batch_var=torch.ones(C - 1) if bad == "batch_mean" else None)
    with pytest.raises(RuntimeError, match={"batch_mean": "`batch_mean` of shape", "residual": "`residual` has shape",
                                            "act": "unknown activation 'swish'", "running_dtype": "`running_mean` to be"}[bad]):
        OPS.bn_act_batch(x, None, None, args["residual"], 1e-5, args["act"], 0.0, args["batch_mean"], args["batch_var"],
                         running_mean, running_var, None, None, counter)
    assert counter.item() == 5
    assert torch.equal(base_mean.float(), before[0]) and torch.equal(base_var.float(), before[1])


_CHILD = """
import re, torch
import resnet_fused
OPS = torch.ops.resnet_fused
def _x(*shape, dtype=torch.float32):
    return torch.randn(shape or (2, 4, 3, 3)).to(dtype)
def _stats(C=4):
    return torch.zeros(C), torch.ones(C)
torch.set_num_threads(16)
# first an aten error (its C++ exception unwinds through torch's frames only), then the dispatcher's error for one
# of our ops (thrown in torch's frames, before any of ours run), then ours (unwinding through this extension's frames)
THEIRS = [("torch.zeros(2) + torch.zeros(3)", "must match"),
          ("OPS.cudnn_conv_add_relu(_x(), _x(3, 4, 3, 3), None, _x(), [1, 1], [1, 1], [1, 1], 1)", "'CPU' backend")]
for call, message in THEIRS + %r:
    print(call, flush=True)
    try:
        eval(call)
    except RuntimeError as e:
        assert re.search(message, str(e)), (call, str(e))
    else:
        raise AssertionError(call + " raised nothing")
print("ok")
"""


@needs_extension
def test_cpp_op_errors_in_a_fresh_process():
    """The C++ errors again, in a child process with 16 threads. The first GPU run (H200, 16 threads,
    pytest-xdist) lost two workers to a segmentation fault in test_cpp_ops_reject_bad_input, each (by
    xdist's scheduling) at the first case it ran, i.e. at the first C++ exception thrown through this
    extension's frames in that process. In a child, such a crash fails this test with its signal, the
    call it died in, its Python stack and (where gdb or cuda-gdb is installed) its native stack."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout's resnet_fused first
    env = {**os.environ, "OMP_NUM_THREADS": "16"}
    cmd = [sys.executable, "-X", "faulthandler", "-c", _CHILD % (CPP_BAD_CALLS,)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=300)
    if result.returncode == 0 and result.stdout.strip().endswith("ok"):
        return
    report = f"exit {result.returncode}"
    if result.returncode < 0:
        report = f"killed by {signal.Signals(-result.returncode).name}"
        debugger = shutil.which("gdb") or shutil.which("cuda-gdb")  # the GPU image has cuda-gdb, not gdb
        if debugger:
            gdb_cmd = [debugger, "-q", "-nx", "-batch", "-iex", "set auto-load off", "-ex", "run", "-ex", "bt 40", "--args",
                       *cmd]
            gdb = subprocess.run(gdb_cmd, capture_output=True, text=True, env=env, cwd=root, timeout=600)
            report += "\n--- gdb ---\n" + gdb.stdout[-12000:]
    pytest.fail(f"{report}\n--- runtime ---\n{_runtime_report()}\n--- calls ---\n{result.stdout[-4000:]}\n"
                f"--- stderr ---\n{result.stderr[-8000:]}")


def _runtime_report() -> str:
    """What a crash in C++ exception handling depends on, read off this process (which loaded the same libraries
    as the child): the kernel (gVisor reports 4.4.0), glibc, the C++ runtime and unwinder libraries mapped, the
    compiler the build took (CXX), and whether x86 shadow stacks (CET) are on for this thread."""
    with open("/proc/self/maps") as maps:
        runtime = sorted({line.split()[-1] for line in maps if re.search(r"lib(stdc\+\+|gcc_s|gomp|unwind)[^/]*$", line)})
    try:
        with open("/proc/self/status") as status:
            cet = [line.strip() for line in status if line.startswith("x86_Thread_features")]
    except OSError:
        cet = []
    return "\n".join([f"kernel {os.uname().release}", f"glibc {os.confstr('CS_GNU_LIBC_VERSION')}",
                      f"CXX={os.environ.get('CXX', '(unset: c++)')}", *_built_by(), *runtime,
                      *(cet or ["x86_Thread_features: (not reported)"])])


def _built_by() -> list[str]:
    """The compilers that built this extension's modules and torch's libc10 (their ELF .comment), by readelf."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return ["built by: (no readelf)"]
    package = os.path.dirname(resnet_fused.__file__)
    libs = sorted(os.path.join(package, f) for f in os.listdir(package) if f.endswith(".so"))
    libs.append(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    lines = []
    for lib in libs:
        dump = subprocess.run([readelf, "-p", ".comment", lib], capture_output=True, text=True).stdout
        compilers = sorted(set(re.findall(r"\]\s+(.+)", dump)))
        lines.append(f"{os.path.basename(lib)} built by: {'; '.join(compilers) or '(no .comment)'}")
    return lines


def test_cudnn_conv_add_relu_rejects_cpu_tensors():
    """resnet_fused::cudnn_conv_add_relu is CUDA-only (conv_act never routes other tensors to it): a CPU call
    says which op and which backend, under autocast too (its autocast rule is registered for CUDA only)."""
    x, w, r = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3), torch.randn(1, 3, 4, 4)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with pytest.raises(NotImplementedError, match=r"resnet_fused::cudnn_conv_add_relu.*'CPU' backend"):
                torch.ops.resnet_fused.cudnn_conv_add_relu(x, w, None, r, [1, 1], [1, 1], [1, 1], 1)


def test_runtime_report_names_the_cpp_runtime():
    """The fresh-process test's crash report (read only when it fails) names the C++ runtime this process loaded."""
    report = _runtime_report()
    assert re.search(r"libstdc\+\+\.so", report) and "kernel " in report and "glibc" in report, report
    assert re.search(r"libc10\.so built by: (GCC|\(no readelf\))", report), report
