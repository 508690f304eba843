"""2-D convolution as an implicit GEMM on NHWC tensors, with a fused prologue and epilogue.

The GEMM. With x (N, H, W, Cin), w (Cout, Cin, KH, KW) and the output (N, Ho, Wo, Cout) dense in
channels_last, the convolution is out (M, Cout) = A (M, K) @ B (K, Cout), where

    M = N*Ho*Wo  rows m = (n, ho, wo),          K = KH*KW*Cin  columns k = (kh*KW + kw)*Cin + ci,
    A[m, k] = x'[n, ho*sh - ph + kh*dh, wo*sw - pw + kw*dw, ci]   (zero outside the image: padding),
    B[k, co] = w[co, ci, kh, kw]                                     (Cout-fastest, cached per weight).

A is never materialized: each program gathers its (BLOCK_M, BLOCK_K) slices of A from x on the fly.
NCHW inputs and residuals are copied to channels_last first. Read in place, their tiles would have no
contiguous axis Triton can prove (ci is H*W apart; w runs only to the end of a row of a flat m tile),
so every element is its own 2-byte load, too small for cp.async: the pipeline then holds in-flight A
tiles in registers. Compiled for sm_90 (fp16, a 3x3 conv with a residual), that spilled in 4 of 8
configs, up to 2.8 KB per thread, where channels_last spilled in 2 of 6 (0.7 KB; configs since fixed,
tests/triton/test_triton_static.py). One copy (read + write of x) costs less.

Prologue (on load, fp32 math, in-bounds elements only, so padding stays exactly zero):
    x' = in_act(x * in_scale[ci] + in_shift[ci]),  in_act = relu or identity (the deferred BN + ReLU);
    then cast back to x's dtype.
Epilogue (on the fp32 accumulator acc = A @ B):
    out = act(acc * out_scale[co] + out_shift[co] (+ residual)), cast to x's dtype, one store; act any
    activation of resnet_fused/activations.py (activation.py: constexpr code ACT, LeakyReLU's slope alpha).
Activations keep NaN (relu is torch.relu: tl.maximum would return 0 for NaN; -0 stays -0).
Statistics (training): per-channel count, mean and M2 = sum (acc - mean)^2 of acc (before the
epilogue) for each BLOCK_M row tile, merged per channel by a tree of Chan combines (welford.merge_stats).

Precision. MMAs take x's dtype and accumulate in fp32. fp32 inputs on a GPU use TF32 MMAs (10-bit
mantissa, ~1e-3 relative error, as cuDNN's convolutions) unless torch.backends.cudnn.allow_tf32 is
False; the interpreter always computes fp32 in IEEE fp32.

Indices: pixel indices (of x and out) are int32 (checked < 2^31), element offsets are int64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakTensorKeyDictionary

from .._layout import conv_output_shape
from .._layout import dense as _dense
from ..backends import triton_interpreted
from ._launch import launch_on
from .activation import RELU, act_code, act_fwd
from .welford import merge_stats

_INTERPRET = triton_interpreted()
_GATHER_MAX_CIN = 16  # Cin below this: K blocks span (kh, kw) taps (the 7x7 stem, Cin = 3)
_SMEM_BYTES = 227 * 1024  # shared memory per block on H100 / H200 (and the most on any GPU today)


def _config(bm, bn, bk, warps, stages):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=warps, num_stages=stages)


# Each config is compiled and timed on the first call of every key. Pipelined smem is about
# num_stages * (BM + BN) * BK * itemsize; configs over _SMEM_BYTES in x's dtype are pruned (fp32:
# 64x256x64 x3). None spills registers on sm_90 (tests/triton/test_triton_static.py): per thread the fp32
# accumulator alone is BM * BN / (32 * num_warps) registers, so 128-row tiles take 8 warps (two
# warpgroups); 128x256 spilled with a residual epilogue even at 8 warps.
_CONFIGS = [
    _config(128, 128, 64, 8, 3),  # Hopper / Ampere, large M and Cout
    _config(64, 256, 64, 8, 3),  # Cout >= 256 (1x1 expansions)
    _config(128, 128, 32, 8, 4),  # Ampere
    _config(128, 64, 64, 8, 4),  # Cout = 64 layers
    _config(64, 128, 64, 4, 4),  # small M (late stages: 14x14, 7x7 maps)
    _config(64, 64, 64, 4, 4),  # small M and Cout
    _config(128, 64, 64, 8, 2),  # 1x1 with Cin = 64: one K step (two at BK 32), nothing to pipeline;
    _config(128, 128, 32, 8, 2),  # Cout = 64 and 256 (128x128x64 x2 spilled on the stem, Triton 3.6)
]
# fp32 without TF32 (IEEE) has no tensor-core MMA: tl.dot runs on FMA units, each thread holding its
# slices of A and B as well; the tiles above spilled there, these do not.
_FMA_CONFIGS = [_config(64, 64, 32, 4, 3), _config(128, 64, 32, 8, 3), _config(64, 128, 32, 8, 3)]
_INTERPRET_CONFIGS = [_config(32, 16, 16, 4, 1)]  # the interpreter is slow: one small tile, no tuning


@triton.jit
def _a_coords(i, h0, w0, Cin, num_c, dil_h, dil_w,
              KH: tl.constexpr, KW: tl.constexpr, GATHER_K: tl.constexpr, BLOCK_K: tl.constexpr):
    # Coordinates of K block i: per column its weight row k, channel ci and validity k_ok, and the
    # input row h and column w, (BLOCK_M, BLOCK_K), or (BLOCK_M, 1) when shared by the whole block.
    #   blocked (Cin >= 16): block i = (tap, ci block), tap = kh*KW + kw, num_c = cdiv(Cin, BLOCK_K)
    #     blocks per tap: one (kh, kw) per block, so h, w are per row and ci is contiguous in x.
    #   gathered (Cin < 16): block i = rows [i*BLOCK_K, (i+1)*BLOCK_K) of all K = KH*KW*Cin, (kh, kw,
    #     ci) decoded per column, so the MMA is not mostly masked channels (7x7 stem: Cin = 3).
    if GATHER_K:
        k = i * BLOCK_K + tl.arange(0, BLOCK_K)
        ci = k % Cin
        tap = k // Cin
        k_ok = k < KH * KW * Cin
        h = h0[:, None] + (tap // KW * dil_h)[None, :]
        w = w0[:, None] + (tap % KW * dil_w)[None, :]
    else:
        tap = i // num_c
        ci = (i % num_c) * BLOCK_K + tl.arange(0, BLOCK_K)
        k = tap * Cin + ci
        k_ok = ci < Cin
        h = (h0 + tap // KW * dil_h)[:, None]
        w = (w0 + tap % KW * dil_w)[:, None]
    return k, ci, k_ok, h, w


@triton.jit(do_not_specialize=["M_BUCKET", "OPERANDS"])
def _conv_kernel(
    x_ptr, w_ptr, out_ptr,  # x (N, H, W, Cin), w (K, Cout), out (M, Cout) = (N, Ho, Wo, Cout), dense
    in_scale_ptr, in_shift_ptr,  # prologue, fp32 (Cin,); each None when absent
    out_scale_ptr, out_shift_ptr,  # epilogue, fp32 (Cout,); each None when absent
    res_ptr,  # residual (M, Cout), or None
    count_ptr, mean_ptr, m2_ptr,  # stats partials, fp32 (>= num_m_tiles, Cout) each; None: no stats
    M, M_BUCKET, OPERANDS, Cin, H, W, Cout, Ho, Wo,  # M_BUCKET, OPERANDS (_operands): autotune key, unused here
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    alpha,  # the epilogue activation's parameter (LeakyReLU's negative slope)
    KH: tl.constexpr, KW: tl.constexpr,
    IN_RELU: tl.constexpr, ACT: tl.constexpr, GATHER_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (pid_m, pid_n) computes the (BLOCK_M, BLOCK_N) tile out[m, co] of the GEMM. Cout tiles
    # are fastest in the 1-D grid, so the programs sharing an A tile (the bulk of the reads) run
    # together and read it once from DRAM; B (the weights) is small and stays in L2.
    pid = tl.program_id(0)
    num_n = tl.cdiv(Cout, BLOCK_N)
    pid_m = pid // num_n
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels (n, ho, wo)
    co = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    co_ok = co < Cout
    wo = m % Wo
    ho = (m // Wo) % Ho
    n = m // (Wo * Ho)
    h0 = ho * stride_h - pad_h  # input pixel of tap (0, 0)
    w0 = wo * stride_w - pad_w

    # K loop: one flat loop (so it software-pipelines) over the K blocks of A and B.
    K = KH * KW * Cin
    num_c = tl.cdiv(Cin, BLOCK_K)  # blocked: ci blocks per tap
    num_k = tl.cdiv(K, BLOCK_K) if GATHER_K else KH * KW * num_c
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(num_k):
        k, ci, k_ok, h, w = _a_coords(i, h0, w0, Cin, num_c, dil_h, dil_w, KH, KW, GATHER_K, BLOCK_K)
        a_ok = m_ok[:, None] & k_ok[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        a_offs = ((n[:, None] * H + h) * W + w).to(tl.int64) * Cin + ci[None, :]
        a = tl.load(x_ptr + a_offs, mask=a_ok, other=0.0)  # (BLOCK_M, BLOCK_K)
        if (in_scale_ptr is not None) or (in_shift_ptr is not None) or IN_RELU:
            xf = a.to(tl.float32)
            if in_scale_ptr is not None:
                xf *= tl.load(in_scale_ptr + ci, mask=k_ok, other=0.0)[None, :]
            if in_shift_ptr is not None:
                xf += tl.load(in_shift_ptr + ci, mask=k_ok, other=0.0)[None, :]
            if IN_RELU:
                xf = act_fwd(xf, RELU, 0.0)
            a = tl.where(a_ok, xf, 0.0).to(x_ptr.dtype.element_ty)  # padding stays 0, not act(shift)
        b = tl.load(w_ptr + k[:, None] * Cout + co[None, :], mask=k_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32

    if count_ptr is not None:
        # Per-channel stats of this tile's n_t valid rows, two passes over registers:
        #   mean_t = sum acc / n_t,  M2_t = sum (acc - mean_t)^2.  Rows past M are excluded.
        n_t = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        mean_t = tl.sum(tl.where(m_ok[:, None], acc, 0.0), axis=0) / n_t
        d = tl.where(m_ok[:, None], acc - mean_t[None, :], 0.0)
        ws = pid_m.to(tl.int64) * Cout + co  # partial (row pid_m, channel co)
        tl.store(count_ptr + ws, tl.zeros((BLOCK_N,), tl.float32) + n_t, mask=co_ok)
        tl.store(mean_ptr + ws, mean_t, mask=co_ok)
        tl.store(m2_ptr + ws, tl.sum(d * d, axis=0), mask=co_ok)

    y = acc
    if out_scale_ptr is not None:
        y *= tl.load(out_scale_ptr + co, mask=co_ok, other=0.0)[None, :]
    if out_shift_ptr is not None:
        y += tl.load(out_shift_ptr + co, mask=co_ok, other=0.0)[None, :]
    out_offs = m.to(tl.int64)[:, None] * Cout + co[None, :]
    out_ok = m_ok[:, None] & co_ok[None, :]
    if res_ptr is not None:
        y += tl.load(res_ptr + out_offs, mask=out_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offs, act_fwd(y, ACT, alpha).to(out_ptr.dtype.element_ty), mask=out_ok)


def _padding(config, nargs, kwargs) -> float:
    # the work of the launched tiles over the GEMM's own: M, Cout and K rounded up to whole tiles
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    M, Cout, Cin = nargs["M"], nargs["Cout"], nargs["Cin"]
    k = kwargs["KH"] * kwargs["KW"] * Cin if kwargs["GATHER_K"] else Cin  # gathered: all of K; blocked: per tap
    return triton.cdiv(M, bm) * bm / M * triton.cdiv(Cout, bn) * bn / Cout * triton.cdiv(k, bk) * bk / k


def _prune(configs, nargs, **kwargs):
    # autotune prune: of the configs, the FMA ones for IEEE fp32 on a GPU, the tensor-core ones
    # otherwise, whose pipelined A and B tiles fit in shared memory in x's dtype; all of them when that
    # leaves none (a list a test restricted, the interpreter's)
    fma = not _INTERPRET and nargs["x_ptr"].dtype == torch.float32 and kwargs["DOT_PRECISION"] == "ieee"
    size = nargs["x_ptr"].element_size()
    kept = [c for c in configs if (c in _FMA_CONFIGS) == fma
            and c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * size <= _SMEM_BYTES]
    kept = kept or configs
    # RESNET_FUSED_TRITON_AUTOTUNE=0: the first config only, no timing (test runs: numerics, not speed,
    # and each config costs a compile on a cold cache)
    if os.environ.get("RESNET_FUSED_TRITON_AUTOTUNE", "1") == "0":
        return kept[:1]
    # RESNET_FUSED_TRITON_MAX_CONFIGS=n: the n whose tiles pad this shape least, in list order among equals
    # (a time-boxed benchmark: fewer compiles and timings per key)
    limit = os.environ.get("RESNET_FUSED_TRITON_MAX_CONFIGS")
    return sorted(kept, key=lambda c: _padding(c, nargs, kwargs))[: int(limit)] if limit else kept


_conv = triton.autotune(
    configs=_INTERPRET_CONFIGS if _INTERPRET else _CONFIGS + _FMA_CONFIGS,
    # M bucketed: a new batch or image size reuses its bucket's choice (no re-tuning, no sync inside
    # a CUDA-graph capture); the fusion (activations, which optional operands) is in it, dtypes join it implicitly
    key=["M_BUCKET", "Cout", "Cin", "KH", "KW", "stride_h", "stride_w", "DOT_PRECISION", "IN_RELU", "ACT", "OPERANDS"],
    prune_configs_by=dict(early_config_prune=_prune),
)(_conv_kernel)


def _operands(*present) -> int:
    # bit i set: the i-th optional operand (in_scale, in_shift, out_scale, out_shift, residual, partials) is given
    return sum(1 << i for i, p in enumerate(present) if p is not None)


def _dot_precision(x: torch.Tensor) -> str:
    if x.dtype == torch.float32 and not _INTERPRET and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"  # fp16/bf16 ignore it; fp32 without TF32


# weight -> ((version, data_ptr, shape, stride, dtype), B): one entry per live weight (weak keys),
# replaced when the weight changes in place (a new _version) or is re-pointed. B is a detached copy:
# it never references the weight, so an entry dies with its weight.
_B_CACHE = WeakTensorKeyDictionary()


def _cacheable(weight: torch.Tensor) -> bool:
    # Not under tracing (fake / functional tensors, torch.compile), not for inference tensors (no
    # version counter), not inside a CUDA-graph capture (the graph must re-read the weight on replay,
    # and a copy made there holds no values until replay).
    return (type(weight) in (torch.Tensor, torch.nn.Parameter) and not torch.compiler.is_compiling()
            and not weight.is_inference()
            and not (weight.is_cuda and torch.cuda.is_current_stream_capturing()))


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """B (K, Cout) dense, B[(kh*KW + kw)*Cin + ci, co] = weight[co, ci, kh, kw]: a B tile is BLOCK_K
    rows of contiguous Cout (coalesced loads). Made once per weight and version (_B_CACHE)."""
    Cout = weight.shape[0]
    if not _cacheable(weight):
        return weight.permute(2, 3, 1, 0).contiguous().view(-1, Cout)
    key = (weight._version, weight.data_ptr(), weight.shape, weight.stride(), weight.dtype)
    hit = _B_CACHE.get(weight)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():  # no autograd edge back to the weight: the entry must not keep it alive
        b = weight.permute(2, 3, 1, 0).contiguous().view(-1, Cout)
    _B_CACHE[weight] = (key, b)
    return b


def fused_conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    in_scale: torch.Tensor | None,
    in_shift: torch.Tensor | None,
    in_relu: bool,
    out_scale: torch.Tensor | None,
    out_shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    act: str,
    alpha: float,
    stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """act(conv2d(in_act(input * in_scale + in_shift), weight) * out_scale + out_shift (+ residual)),
    in_act = relu if in_relu else identity; act, alpha: an activation of resnet_fused/activations.py by
    name, and LeakyReLU's negative slope.

    Returns (out, mean, var): out (N, Cout, Ho, Wo) channels_last in input's dtype; with stats, the
    fp32 (Cout,) mean and biased variance over (N, Ho, Wo) of the raw convolution (before out_scale,
    out_shift, residual, act), else two empty fp32 tensors. Inputs are validated by the op layer.
    """
    x = input.contiguous(memory_format=torch.channels_last)  # (N, H, W, Cin) in memory
    N, Cin, H, W = x.shape
    Cout, _, KH, KW = weight.shape
    code = act_code("resnet_fused::triton_conv_bn_act", act)
    if weight.dtype != x.dtype:
        raise RuntimeError(f"resnet_fused::triton_conv_bn_act: `weight` is {weight.dtype} but `input` is {x.dtype}")
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    _, _, Ho, Wo = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    M = N * Ho * Wo
    out = torch.empty((N, Cout, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    stat_shape = (Cout,) if stats else (0,)
    if M == 0:
        return out, x.new_zeros(stat_shape, dtype=torch.float32), x.new_zeros(stat_shape, dtype=torch.float32)
    if max(N * H * W, M, KH * KW * Cin * Cout) >= 2**31:  # pixel and weight indices are int32
        raise RuntimeError(f"resnet_fused::triton_conv_bn_act: input {tuple(x.shape)} -> output {(N, Cout, Ho, Wo)} "
                           f"with weight {tuple(weight.shape)} has 2^31 pixels or weights or more (int32 indices)")

    partials = None
    if stats:  # rows for the smallest BLOCK_M; the launched config fills the first cdiv(M, BLOCK_M)
        min_block_m = min(c.kwargs["BLOCK_M"] for c in _conv.configs)
        partials = torch.empty((3, triton.cdiv(M, min_block_m), Cout), dtype=torch.float32, device=x.device)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(Cout, meta["BLOCK_N"]),)

    with launch_on(x.device):  # Triton launches on the current CUDA device: make it x's
        _conv[grid](
            x, _weight_matrix(weight), out,
            _dense(in_scale), _dense(in_shift), _dense(out_scale), _dense(out_shift),
            _dense(residual, torch.channels_last),
            *((partials[0], partials[1], partials[2]) if stats else (None, None, None)),
            M, triton.next_power_of_2(M), _operands(in_scale, in_shift, out_scale, out_shift, residual, partials),
            Cin, H, W, Cout, Ho, Wo,
            sh, sw, ph, pw, dh, dw, float(alpha),
            KH=KH, KW=KW, IN_RELU=in_relu, ACT=code, GATHER_K=Cin < _GATHER_MAX_CIN,
            DOT_PRECISION=_dot_precision(x),
        )
        if not stats:
            empty = x.new_empty((0,), dtype=torch.float32)
            return out, empty, empty.clone()
        mean, var = merge_stats(partials, triton.cdiv(M, _conv.best_config.kwargs["BLOCK_M"]))
    return out, mean, var
