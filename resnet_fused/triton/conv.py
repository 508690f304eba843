"""2-D convolution as an implicit GEMM on NHWC tensors, with a fused prologue and epilogue.

The GEMM. With x (N, H, W, Cin), w (Cout, Cin, KH, KW) and the output (N, Ho, Wo, Cout) dense in
channels_last, the convolution is out (M, Cout) = A (M, K) @ B (K, Cout), where

    M = N*Ho*Wo  rows m = (n, ho, wo),          K = KH*KW*Cin  columns k = (kh*KW + kw)*Cin + ci,
    A[m, k] = x'[n, ho*sh - ph + kh*dh, wo*sw - pw + kw*dw, ci]   (zero outside the image: padding),
    B[k, co] = w[co, ci, kh, kw]                                     (reordered once per call, Cout-fastest).

A is never materialized: each program gathers its (BLOCK_M, BLOCK_K) slices of A from x on the fly.

Prologue (on load, fp32 math, in-bounds elements only, so padding stays exactly zero):
    x' = act(x * in_scale[ci] + in_shift[ci]),  act = relu or identity; then cast back to x's dtype.
Epilogue (on the fp32 accumulator acc = A @ B):
    out = act(acc * out_scale[co] + out_shift[co] (+ residual)), cast to x's dtype, one store.
Statistics (training): per-channel count, mean and M2 = sum (acc - mean)^2 of acc (before the
epilogue) for each BLOCK_M row tile, merged per channel by bn_act's Chan combine kernel.

Precision. MMAs take x's dtype and accumulate in fp32. fp32 inputs on a GPU use TF32 MMAs (10-bit
mantissa, ~1e-3 relative error, as cuDNN's convolutions) unless torch.backends.cudnn.allow_tf32 is
False; the interpreter always computes fp32 in IEEE fp32.

Indices: pixel indices (of x and out) are int32 (asserted < 2^31), element offsets are int64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .bn_act import _bn_stats_combine_kernel

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_GATHER_MAX_CIN = 16  # Cin below this: K blocks span (kh, kw) taps (the 7x7 stem, Cin = 3)
_COMBINE_BLOCK_R = 64
_COMBINE_MAX_BLOCK_C = 32


def _config(bm, bn, bk, warps, stages):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=warps, num_stages=stages)


# At most 6 configs: each is compiled and timed on the first call of every key. fp16/bf16 smem per
# stage is (BM + BN) * BK * 2 bytes; configs that do not fit (e.g. fp32 128x256x64 x3) are skipped.
_CONFIGS = [
    _config(128, 128, 64, 8, 3),  # Hopper / Ampere, large M and Cout
    _config(128, 256, 64, 8, 3),  # Hopper, Cout >= 256 (1x1 expansions)
    _config(128, 128, 32, 4, 4),  # Ampere
    _config(128, 64, 64, 4, 4),  # Cout = 64 layers
    _config(64, 128, 64, 4, 4),  # small M (late stages: 14x14, 7x7 maps)
    _config(64, 64, 64, 4, 4),  # small M and Cout
]
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


@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, out_ptr,  # x (N, H, W, Cin), w (K, Cout), out (M, Cout) = (N, Ho, Wo, Cout), dense
    in_scale_ptr, in_shift_ptr,  # prologue, fp32 (Cin,); each None when absent
    out_scale_ptr, out_shift_ptr,  # epilogue, fp32 (Cout,); each None when absent
    res_ptr,  # residual (M, Cout), or None
    count_ptr, mean_ptr, m2_ptr,  # stats partials, fp32 (>= num_m_tiles, Cout) each; None: no stats
    M, Cin, H, W, Cout, Ho, Wo,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    IN_RELU: tl.constexpr, RELU: tl.constexpr, GATHER_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
    num_c = tl.cdiv(Cin, BLOCK_K)  # blocked: ci blocks per tap
    num_k = tl.cdiv(KH * KW * Cin, BLOCK_K) if GATHER_K else KH * KW * num_c
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
                xf = tl.maximum(xf, 0.0)
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
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=out_ok)


_conv = triton.autotune(
    configs=_INTERPRET_CONFIGS if _INTERPRET else _CONFIGS,
    key=["M", "Cout", "Cin", "KH", "KW", "stride_h", "stride_w", "DOT_PRECISION"],  # + dtypes, implicitly
)(_conv_kernel)


def _dense(t: torch.Tensor | None, fmt: torch.memory_format = torch.contiguous_format) -> torch.Tensor | None:
    return None if t is None else t.contiguous(memory_format=fmt)


def _dot_precision(x: torch.Tensor) -> str:
    if x.dtype == torch.float32 and not _INTERPRET and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"  # fp16/bf16 ignore it; fp32 without TF32


def conv_bn_act(
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
    relu: bool,
    stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """act(conv2d(in_act(input * in_scale + in_shift), weight) * out_scale + out_shift (+ residual)).

    Returns (out, mean, var): out (N, Cout, Ho, Wo) channels_last in input's dtype; with stats, the
    fp32 (Cout,) mean and biased variance over (N, Ho, Wo) of the raw convolution (before out_scale,
    out_shift, residual, relu), else two empty fp32 tensors. Inputs are validated by the op layer.
    """
    x = input.contiguous(memory_format=torch.channels_last)  # (N, H, W, Cin) in memory
    N, Cin, H, W = x.shape
    Cout, _, KH, KW = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Ho = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    M = N * Ho * Wo
    out = torch.empty((N, Cout, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    stat_shape = (Cout,) if stats else (0,)
    if M == 0:
        return out, x.new_zeros(stat_shape, dtype=torch.float32), x.new_zeros(stat_shape, dtype=torch.float32)
    assert weight.dtype == x.dtype and N * H * W < 2**31 and M < 2**31 and KH * KW * Cin * Cout < 2**31

    # B (K, Cout), K = (kh, kw, ci): a B tile is BLOCK_K rows of contiguous Cout (coalesced loads).
    w = weight.permute(2, 3, 1, 0).contiguous().view(KH * KW * Cin, Cout)
    partials = None
    if stats:  # rows for the smallest BLOCK_M; the launched config fills the first cdiv(M, BLOCK_M)
        min_block_m = min(c.kwargs["BLOCK_M"] for c in _conv.configs)
        partials = torch.empty((3, triton.cdiv(M, min_block_m), Cout), dtype=torch.float32, device=x.device)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(Cout, meta["BLOCK_N"]),)

    _conv[grid](
        x, w, out,
        _dense(in_scale), _dense(in_shift), _dense(out_scale), _dense(out_shift),
        _dense(residual, torch.channels_last),
        *((partials[0], partials[1], partials[2]) if stats else (None, None, None)),
        M, Cin, H, W, Cout, Ho, Wo, sh, sw, ph, pw, dh, dw,
        KH=KH, KW=KW, IN_RELU=in_relu, RELU=relu, GATHER_K=Cin < _GATHER_MAX_CIN,
        DOT_PRECISION=_dot_precision(x),
    )
    if not stats:
        empty = x.new_empty((0,), dtype=torch.float32)
        return out, empty, empty.clone()

    # Second level: merge the cdiv(M, BLOCK_M) row-tile partials per channel (Chan, fixed order).
    num_tiles = triton.cdiv(M, _conv.best_config.kwargs["BLOCK_M"])
    mean = torch.empty(Cout, dtype=torch.float32, device=x.device)
    var = torch.empty_like(mean)
    block_c = min(triton.next_power_of_2(Cout), _COMBINE_MAX_BLOCK_C)
    _bn_stats_combine_kernel[(triton.cdiv(Cout, block_c),)](
        partials[0], partials[1], partials[2], mean, var, num_tiles, Cout,
        BLOCK_R=_COMBINE_BLOCK_R, BLOCK_C=block_c,
    )
    return out, mean, var
