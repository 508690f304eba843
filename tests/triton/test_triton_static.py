"""Static GPU checks without a GPU: every Triton kernel of resnet_fused.triton compiled for sm_90.

Each kernel is compiled as its launcher launches it (every autotune config the autotuner keeps; fp16,
bf16, fp32 with TF32 and, for the conv, fp32 in IEEE) for an H100 / H200 (sm_90), and each compiled
kernel must: compile; not spill registers (ptxas's report); fit the H100's 227 KB of shared memory;
and, where it has an fp16 / bf16 tl.dot, use wgmma (Hopper's warpgroup MMA) in its PTX.

How. This session interprets Triton (conftest sets TRITON_INTERPRET=1 without a GPU), so its kernels
are interpreter objects: the compiles run in worker processes (this file as a script) with
TRITON_INTERPRET unset. A worker calls the real launchers on meta tensors of ResNet-50 shapes with
JITFunction.run and Autotuner.run replaced by a recorder, so what it compiles is exactly what they
would launch (arguments, constexprs, and per autotuned launch every config left after the autotuner's
own pruning); each distinct launch goes through Triton's argument binder (the signature, constexprs
and divisibility attributes a launch would specialize on) into
triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)), which runs ptxas but needs no GPU.
The workers split the launches between them (CI has 2 cores).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

import resnet_fused

SMEM_LIMIT = 227 * 1024  # H100 / H200: shared memory per block (opt-in maximum)
TARGET_ARCH = 90
WORKER_TIMEOUT_S = 900


# ---------------------------------------------------------------------------------------------
# Worker side: record the launches, compile a share of them
# ---------------------------------------------------------------------------------------------


def _meta(shape, dtype, channels_last=True):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


def _drive_launchers(dtype: torch.dtype, ieee: bool, case: list):
    """Call every launcher of resnet_fused.triton once per kind of launch, on meta tensors; case[1]: the launch."""
    from resnet_fused.activations import ACTIVATIONS
    from resnet_fused.triton import add_relu, bn_act, bn_coeffs, conv

    def vec(c):
        return torch.empty(c, dtype=torch.float32, device="meta")

    with _tf32(not ieee):
        # all fusions a launch can combine (training: prologue + statistics; eval: epilogue + residual;
        # one launch with all of them bounds the registers of both), blocked K (Cin = 64), with ReLU and,
        # for fp16 (wgmma tiles) and IEEE fp32 (FMA tiles), with GELU (the longest activation math: erf);
        # and the 7x7 stem (Cin = 3: gathered K), which has no BN before it (no prologue) and no residual
        x, w, c = _meta((32, 64, 56, 56), dtype), _meta((64, 64, 3, 3), dtype), vec(64)
        for act in ("relu", "gelu") if dtype == torch.float16 or ieee else ("relu",):
            case[1] = f"3x3 all fusions {act}"
            conv.fused_conv(x, w, (1, 1), (1, 1), (1, 1), c, c, True, c, c, x, act, 0.0, True)
        case[1] = "7x7 stem stats+epilogue"
        conv.fused_conv(_meta((32, 3, 224, 224), dtype), _meta((64, 3, 7, 7), dtype), (2, 2), (3, 3), (1, 1),
                         None, None, False, c, c, None, "relu", 0.0, True)
    if ieee:
        return
    # the normalization launchers, past their argument checks (which accept CUDA tensors only)
    stats, apply, act_backward, reduce, elemt, add = (getattr(f, "__wrapped__", f) for f in (
        bn_act.bn_stats, bn_act.bn_act_apply, bn_act.act_backward, bn_act.bn_act_backward_reduce,
        bn_act.bn_act_backward_elemt, add_relu.add_relu))
    for cl in (True, False):
        case[1] = "channels_last" if cl else "nchw"
        y = _meta((32, 256, 56, 56), dtype, cl)
        c = vec(256)
        stats(y)
        apply(y, c, c, y, "relu", 0.0)
        act_backward(y, y, c, c, y, "gelu", 0.0)
        reduce(y, y, c, y)
        elemt(y, y, y, c, c, c, c, True)
        add(y, y)
    if dtype == torch.float16:  # every activation's forward and derivative (their code paths), once
        y, c = _meta((32, 256, 56, 56), dtype), vec(256)
        for act in ACTIVATIONS:
            case[1] = f"channels_last {act}"
            apply(y, c, c, y, act, 0.2)
            act_backward(y, y, c, c, y, act, 0.2)
    # the per-channel coefficient launchers: fp32 (C,) vectors whatever the activation dtype
    scale_shift, coeffs = (getattr(f, "__wrapped__", f) for f in (bn_coeffs.bn_scale_shift, bn_coeffs.bn_backward_coeffs))
    c = vec(256)
    case[1] = "per-channel"
    scale_shift(c, c, c, c, 1e-5)
    for training in (True, False):
        coeffs(c, c, c, c, 1e-5, 802816.0, training)


@contextlib.contextmanager
def _tf32(on: bool):
    was = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = was


def _record_launches():
    """[(label, JITFunction, args, kwargs)]: every launch of _drive_launchers, autotuned ones once per kept config."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    records, case = [], []

    def jit_run(self, *args, grid, warmup, **kwargs):
        records.append((f"{self.__name__}[{case[1]}, {case[0]}]", self, args, kwargs))

    def tune_run(self, *args, grid=None, warmup=False, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)  # the autotuner's own pruning
        self.nargs = None
        for c in configs:
            k = c.kwargs
            tile = f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{c.num_warps} s{c.num_stages}"
            records.append((f"{self.fn.__name__}[{case[1]}, {case[0]}, {tile}]", self.fn, args,
                            {**kwargs, **c.all_kwargs()}))
        self.best_config = configs[0]  # read by the launcher after the launch

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, tune_run
    try:
        for name, dtype, ieee in (("fp16", torch.float16, False), ("bf16", torch.bfloat16, False),
                                  ("fp32", torch.float32, False), ("fp32 ieee", torch.float32, True)):
            case[:] = [name, ""]
            _drive_launchers(dtype, ieee, case)
    finally:
        JITFunction.run, Autotuner.run = saved
    return records


def _jobs(target):
    """Distinct compile jobs [(label, fn, signature, constexprs, attrs, options)], in a fixed order."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    jobs, seen = [], set()
    for label, fn, args, kwargs in _record_launches():
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        key = (fn.__name__, str(signature), str(constexprs), str(attrs), options.hash())
        if key not in seen:  # e.g. the statistics merge is the same kernel for every dtype
            seen.add(key)
            jobs.append((label, fn, signature, constexprs, attrs, options))
    return jobs


def _compile(job, target) -> dict:
    import triton
    from triton.compiler import ASTSource

    label, fn, signature, constexprs, attrs, options = job
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1: ptxas -v's report goes to stdout
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
    except Exception as e:  # noqa: BLE001 (reported per kernel by the test)
        return dict(label=label, kernel=fn.__name__, error=f"{type(e).__name__}: {e}"[:2000])
    text = log.getvalue()
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    regs = re.search(r"Used (\d+) registers", text)
    return dict(
        label=label, kernel=fn.__name__, shared=kernel.metadata.shared, num_warps=kernel.metadata.num_warps,
        registers=int(regs.group(1)) if regs else None,
        spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else None,
        dot_16bit=bool(re.search(r"tt\.dot\b.*tensor<[0-9x]+x(f16|bf16)>", kernel.asm["ttir"])),
        wgmma="wgmma.mma_async" in kernel.asm["ptx"],
    )


def _why_no_cuda_target(target):
    """None if this Triton can compile for target here, else why not."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import make_backend

        make_backend(target)
        subprocess.run([get_ptxas(target.arch).path, "--version"], check=True, capture_output=True)
    except Exception as e:  # noqa: BLE001
        return f"the installed Triton cannot target CUDA sm_{target.arch} here: {type(e).__name__}: {e}"
    return None


def _worker(shard: int, shards: int, out_path: str) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    from resnet_fused.triton import add_relu, bn_act, bn_coeffs, conv, welford

    assert os.environ.get("TRITON_INTERPRET", "0") != "1" and isinstance(conv._conv.fn, JITFunction)
    target = GPUTarget("cuda", TARGET_ARCH, 32)
    why = _why_no_cuda_target(target)
    if why is not None:
        result = dict(skip=why)
    else:
        jobs = _jobs(target)
        kernels = sorted(name for m in (add_relu, bn_act, bn_coeffs, conv, welford) for name, v in vars(m).items()
                         if isinstance(v, JITFunction) and name.endswith("_kernel"))
        result = dict(triton=triton.__version__, total=len(jobs), kernels=kernels,
                      launched=sorted({job[1].__name__ for job in jobs}),
                      results=[_compile(job, target) for job in jobs[shard::shards]])
    with open(out_path, "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------------------------
# Test side
# ---------------------------------------------------------------------------------------------


def _workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 4))


@pytest.fixture(scope="module")
def compiled():
    """All compile results, from _workers() worker processes (TRITON_INTERPRET unset, a fresh Triton cache)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the workers import the resnet_fused this process imported (a script's sys.path[0] is its own folder)
    root = os.path.dirname(os.path.dirname(resnet_fused.__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=os.path.join(tmp, "cache"))
        n = _workers()
        outs = [os.path.join(tmp, f"shard{i}.json") for i in range(n)]
        procs = [subprocess.Popen([sys.executable, __file__, str(i), str(n), outs[i]], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(n)]
        try:
            logs = [p.communicate(timeout=WORKER_TIMEOUT_S)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p, log in zip(procs, logs):
            assert p.returncode == 0, f"compile worker failed (exit {p.returncode}):\n{log[-4000:]}"
        shards = []
        for path in outs:
            with open(path) as f:
                shards.append(json.load(f))
    if "skip" in shards[0]:
        pytest.skip(shards[0]["skip"])
    results = [r for s in shards for r in s["results"]]
    assert len(results) == shards[0]["total"]
    return dict(shards[0], results=sorted(results, key=lambda r: r["label"]))


def _table(rows) -> str:
    return "\n".join(f"  {r['label']}: " + (r["error"][:300] if "error" in r else
                                              f"{r['registers']} regs, spills {r['spill_bytes']} B, "
                                              f"smem {r['shared']} B, wgmma {r['wgmma']}") for r in rows)


def test_every_kernel_is_launched(compiled):
    """Each @triton.jit *_kernel of resnet_fused.triton is among the compiled launches (none forgotten here)."""
    missing = sorted(set(compiled["kernels"]) - set(compiled["launched"]))
    assert not missing, f"kernels no launcher call in _drive_launchers reaches: {missing}"


def test_compiles(compiled):
    bad = [r for r in compiled["results"] if "error" in r]
    assert not bad, f"{len(bad)} of {len(compiled['results'])} kernels do not compile for sm_90:\n{_table(bad)}"


def test_no_register_spills(compiled):
    ok = [r for r in compiled["results"] if "error" not in r]
    assert all(r["spill_bytes"] is not None for r in ok), "no ptxas report (TRITON_DUMP_PTXAS_LOG ignored?)"
    bad = [r for r in ok if r["spill_bytes"]]
    assert not bad, f"{len(bad)} kernels spill registers on sm_90:\n{_table(bad)}"


def test_shared_memory_fits_h100(compiled):
    bad = [r for r in compiled["results"] if "error" not in r and r["shared"] > SMEM_LIMIT]
    assert not bad, f"{len(bad)} kernels need more than {SMEM_LIMIT} B of shared memory:\n{_table(bad)}"


def test_16bit_dots_use_wgmma(compiled):
    dots = [r for r in compiled["results"] if "error" not in r and r["dot_16bit"]]
    assert dots, "no fp16 / bf16 tl.dot kernel was compiled"
    bad = [r for r in dots if not r["wgmma"]]
    assert not bad, f"{len(bad)} fp16 / bf16 dot kernels without wgmma on sm_90:\n{_table(bad)}"


if __name__ == "__main__":  # worker: python test_triton_static.py SHARD SHARDS OUT.json
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
