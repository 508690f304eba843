"""Batch-norm + activation in Triton: statistics, apply, and the two backward passes.

The plane view. All activations of one call are laid out densely in input's memory format and seen
as P planes of S pixels, a plane being a run of elements that share one channel:

    channels_last (N, H, W, C): P = C,   S = N*H*W   element (p, s) at s*C + p   channel p
    contiguous    (N, C, H, W): P = N*C, S = H*W     element (p, s) at p*S + s   channel p % C

Programs work on (BLOCK_P, BLOCK_S) tiles of this view: channels_last tiles are BLOCK_P channels x
BLOCK_S rows of the (N*H*W, C) matrix, contiguous tiles are BLOCK_P planes x BLOCK_S pixels. A
per-channel vector is gathered once per tile as (BLOCK_P,) and broadcast along pixels. Math runs in
fp32; per-channel vectors are fp32 (C,); offsets are int64.

Activations: bn_act_apply and act_backward take any activation of resnet_fused/activations.py
(activation.py: a constexpr code ACT, LeakyReLU's slope alpha), NaN in giving NaN out; act_backward
recomputes z = x * scale[c] + shift[c] (+ residual) instead of reading a saved one. The BN backward
passes take ReLU's mask from the saved output, as threshold_backward: dy = 0 where out <= 0, else
grad_out (a NaN out passes it).

Reductions (over N, H, W = over pixels, then over the planes of one channel) are two-level and
deterministic: each program reduces BLOCK_P planes over one chunk of pixels into fp32 partials of
shape (R, C), R = (P // C) * num_chunks, row (p // C) * num_chunks + chunk; a second pass reduces R.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._layout import dense as _dense
from .._layout import memory_format as _memory_format
from ._launch import launcher
from .activation import act_code, act_fwd, act_grad
from .welford import chan_merge, merge_stats

_TILE = 2048  # elements per (BLOCK_P, BLOCK_S) tile
_MAX_BLOCK_C = 64  # channels_last: at most this many channels per tile
_MAX_BLOCK_HW = 1024  # contiguous: at most this many pixels per tile
_REDUCE_PROGRAMS = 1024  # reductions split pixels into chunks until about this many programs run


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _offsets(p, s, S, C, CHANNELS_LAST: tl.constexpr):
    # (BLOCK_P, BLOCK_S) memory offsets of elements (p, s) of the plane view.
    if CHANNELS_LAST:
        return s[None, :] * C + p[:, None]
    else:
        return p[:, None] * S + s[None, :]


@triton.jit
def _tile(P, S, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
    # 1-D grid over cdiv(P, BLOCK_P) x cdiv(S, BLOCK_S) tiles, plane blocks fastest.
    pid = tl.program_id(0).to(tl.int64)
    num_p = tl.cdiv(P, BLOCK_P)
    p = (pid % num_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    s = (pid // num_p) * BLOCK_S + tl.arange(0, BLOCK_S)
    return p, s


@triton.jit
def _pre_activation(x_ptr, scale_ptr, shift_ptr, res_ptr, p, offs, mask, C):
    # z = x * scale[c] + shift[c] (+ res), fp32 (BLOCK_P, BLOCK_S), c = p % C (always in range: no mask)
    c = p % C
    z = tl.load(x_ptr + offs, mask=mask).to(tl.float32) * tl.load(scale_ptr + c)[:, None]
    z += tl.load(shift_ptr + c)[:, None]
    if res_ptr is not None:
        z += tl.load(res_ptr + offs, mask=mask).to(tl.float32)
    return z


@triton.jit
def _bn_act_apply_kernel(
    x_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr,  # res_ptr: None without residual
    P, S, C, alpha,
    ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # out = act(z),  z = x * scale[c] + shift[c] (+ res)
    p, s = _tile(P, S, BLOCK_P, BLOCK_S)
    offs = _offsets(p, s, S, C, CHANNELS_LAST)
    mask = (p < P)[:, None] & (s < S)[None, :]
    z = _pre_activation(x_ptr, scale_ptr, shift_ptr, res_ptr, p, offs, mask, C)
    tl.store(out_ptr + offs, act_fwd(z, ACT, alpha).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_backward_kernel(
    g_ptr, x_ptr, scale_ptr, shift_ptr, res_ptr, grad_ptr,  # res_ptr: None without residual
    P, S, C, alpha,
    ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grad = g * act'(z),  z = x * scale[c] + shift[c] (+ res) recomputed
    p, s = _tile(P, S, BLOCK_P, BLOCK_S)
    offs = _offsets(p, s, S, C, CHANNELS_LAST)
    mask = (p < P)[:, None] & (s < S)[None, :]
    z = _pre_activation(x_ptr, scale_ptr, shift_ptr, res_ptr, p, offs, mask, C)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    tl.store(grad_ptr + offs, act_grad(g, z, ACT, alpha).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_act_backward_elemt_kernel(
    g_ptr, y_ptr, x_ptr,  # grad_out, saved output (None: no relu), input (None: eval)
    mean_ptr, dy_scale_ptr, x_scale_ptr, shift_ptr,  # per channel; mean, x_scale, shift None iff x_ptr is None
    grad_in_ptr, grad_res_ptr,  # grad_res_ptr: None when grad_residual is not needed
    P, S, C,
    CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # dy = (y <= 0) ? 0 : g;  grad_in = dy * dy_scale[c] (+ (x - mean[c]) * x_scale[c] + shift[c]);  grad_res = dy
    p, s = _tile(P, S, BLOCK_P, BLOCK_S)
    offs = _offsets(p, s, S, C, CHANNELS_LAST)
    mask = (p < P)[:, None] & (s < S)[None, :]
    c = p % C
    dy = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    if y_ptr is not None:
        dy = tl.where(tl.load(y_ptr + offs, mask=mask) <= 0, 0.0, dy)  # y = NaN passes g
    gi = dy * tl.load(dy_scale_ptr + c)[:, None]
    if x_ptr is not None:
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        xmu = x - tl.load(mean_ptr + c)[:, None]  # centred first: no cancellation when |mean| >> std
        gi += xmu * tl.load(x_scale_ptr + c)[:, None] + tl.load(shift_ptr + c)[:, None]
    tl.store(grad_in_ptr + offs, gi.to(grad_in_ptr.dtype.element_ty), mask=mask)
    if grad_res_ptr is not None:
        tl.store(grad_res_ptr + offs, dy.to(grad_res_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_stats_partial_kernel(
    x_ptr, count_ptr, mean_ptr, m2_ptr,  # partials: fp32 (R, C) each
    P, S, C, CHUNK_S,
    CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Program (plane block, chunk k) reduces pixels [k*CHUNK_S, (k+1)*CHUNK_S) of BLOCK_P planes to
    # (count, mean, M2 = sum (x - mean)^2), one tile at a time: per tile two passes in registers
    # (mean_t = sum x / n_t, then M2_t = sum (x - mean_t)^2), merged into the running stats with
    # Chan's formula, d = mean_t - mean:
    #   n' = n + n_t,  mean' = mean + d * n_t / n',  M2' = M2 + M2_t + d^2 * n * n_t / n'
    pid = tl.program_id(0).to(tl.int64)
    num_p = tl.cdiv(P, BLOCK_P)
    p = (pid % num_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    k = pid // num_p
    s_begin = k * CHUNK_S
    s_end = tl.minimum(s_begin + CHUNK_S, S)

    n = 0.0
    mean = tl.zeros((BLOCK_P,), tl.float32)
    m2 = tl.zeros((BLOCK_P,), tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (p < P)[:, None] & (s < s_end)[None, :]
        x = tl.load(x_ptr + _offsets(p, s, S, C, CHANNELS_LAST), mask=mask, other=0.0).to(tl.float32)
        n_t = tl.minimum(s_end - s0, BLOCK_S).to(tl.float32)  # same for every plane of the tile
        mean_t = tl.sum(x, axis=1) / n_t
        d = tl.where(mask, x - mean_t[:, None], 0.0)
        n, mean, m2 = chan_merge(n, mean, m2, n_t, mean_t, tl.sum(d * d, axis=1))

    ws = ((p // C) * tl.cdiv(S, CHUNK_S) + k) * C + p % C  # partial (row, channel)
    tl.store(count_ptr + ws, tl.zeros((BLOCK_P,), tl.float32) + n, mask=p < P)
    tl.store(mean_ptr + ws, mean, mask=p < P)
    tl.store(m2_ptr + ws, m2, mask=p < P)


@triton.jit
def _bn_act_backward_reduce_kernel(
    g_ptr, x_ptr, mean_ptr, y_ptr,  # grad_out, input, fp32 (C,) mean, saved output (None: no relu)
    sum_dy_ptr, sum_dy_xmu_ptr,  # partials: fp32 (R, C) each
    P, S, C, CHUNK_S,
    CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Program (plane block, chunk k) sums over pixels [k*CHUNK_S, (k+1)*CHUNK_S) of BLOCK_P planes:
    #   sum dy,  sum dy * (x - mean[c]),   dy = (y <= 0) ? 0 : g
    pid = tl.program_id(0).to(tl.int64)
    num_p = tl.cdiv(P, BLOCK_P)
    p = (pid % num_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    k = pid // num_p
    s_begin = k * CHUNK_S
    s_end = tl.minimum(s_begin + CHUNK_S, S)
    c = p % C
    mean = tl.load(mean_ptr + c)[:, None]

    acc_dy = tl.zeros((BLOCK_P,), tl.float32)
    acc_dy_xmu = tl.zeros((BLOCK_P,), tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        offs = _offsets(p, s, S, C, CHANNELS_LAST)
        mask = (p < P)[:, None] & (s < s_end)[None, :]
        dy = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # 0 outside the tile
        if y_ptr is not None:
            dy = tl.where(tl.load(y_ptr + offs, mask=mask, other=0.0) <= 0, 0.0, dy)  # y = NaN passes g
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc_dy += tl.sum(dy, axis=1)
        acc_dy_xmu += tl.sum(dy * (x - mean), axis=1)

    ws = ((p // C) * tl.cdiv(S, CHUNK_S) + k) * C + c
    tl.store(sum_dy_ptr + ws, acc_dy, mask=p < P)
    tl.store(sum_dy_xmu_ptr + ws, acc_dy_xmu, mask=p < P)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """The plane view of an (N, C, H, W) tensor laid out in a memory format, and its tile shape."""

    channels_last: bool
    C: int
    P: int  # planes
    S: int  # pixels per plane
    block_p: int
    block_s: int

    @property
    def num_p(self) -> int:
        return triton.cdiv(self.P, self.block_p)

    def reduce_chunks(self) -> tuple[int, int]:
        """(chunk_s, num_chunks): pixels per reduction program (a multiple of block_s), and chunks."""
        tiles_s = triton.cdiv(self.S, self.block_s)
        num_chunks = min(tiles_s, max(1, _REDUCE_PROGRAMS // self.num_p))
        chunk_s = self.block_s * triton.cdiv(tiles_s, num_chunks)
        return chunk_s, triton.cdiv(self.S, chunk_s)


def _plan(x: torch.Tensor, fmt: torch.memory_format) -> _Plan:
    return _tile_plan(*x.shape, fmt == torch.channels_last)


@functools.lru_cache(maxsize=1024)  # a model sees a few dozen shapes: worked out once each, not per launch
def _tile_plan(N: int, C: int, H: int, W: int, channels_last: bool) -> _Plan:
    if channels_last:  # tile: block_p channels x block_s rows of (N*H*W, C)
        block_p = min(triton.next_power_of_2(C), _MAX_BLOCK_C, _TILE)
        return _Plan(True, C, C, N * H * W, block_p, _TILE // block_p)
    block_s = min(triton.next_power_of_2(H * W), _MAX_BLOCK_HW, _TILE)  # tile: planes x pixels
    return _Plan(False, C, N * C, H * W, _TILE // block_s, block_s)


@launcher("resnet_fused::triton_bn_stats")
def bn_stats(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over (N, H, W), fp32 (C,) each."""
    fmt = _memory_format(input)
    x = input.contiguous(memory_format=fmt)
    C = x.shape[1]
    if x.numel() == 0:
        return x.new_zeros(C, dtype=torch.float32), x.new_zeros(C, dtype=torch.float32)
    plan = _plan(x, fmt)
    chunk_s, num_chunks = plan.reduce_chunks()
    R = plan.P // C * num_chunks
    partials = torch.empty((3, R, C), dtype=torch.float32, device=x.device)  # planes (count, mean, M2)
    _bn_stats_partial_kernel[(plan.num_p * num_chunks,)](
        x, *partials, plan.P, plan.S, C, chunk_s,
        CHANNELS_LAST=plan.channels_last, BLOCK_P=plan.block_p, BLOCK_S=plan.block_s,
    )
    return merge_stats(partials, R)


@launcher("resnet_fused::triton_bn_act_apply", like=("residual",), per_channel=("scale", "shift"))
def bn_act_apply(
    input: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    act: str,
    alpha: float,
) -> torch.Tensor:
    """act(input * scale[c] + shift[c] (+ residual)), in input's dtype and memory format; act, alpha: an
    activation of resnet_fused/activations.py by name, and LeakyReLU's negative slope."""
    code = act_code("resnet_fused::triton_bn_act_apply", act)
    fmt = _memory_format(input)
    x, res = _dense(input, fmt), _dense(residual, fmt)
    out = torch.empty_like(x, memory_format=fmt)
    if x.numel() == 0:
        return out
    plan = _plan(x, fmt)
    _bn_act_apply_kernel[(plan.num_p * triton.cdiv(plan.S, plan.block_s),)](
        x, _dense(scale), _dense(shift), res, out, plan.P, plan.S, plan.C, float(alpha),
        ACT=code, CHANNELS_LAST=plan.channels_last, BLOCK_P=plan.block_p, BLOCK_S=plan.block_s,
    )
    return out


@launcher("resnet_fused::triton_act_backward", like=("input", "residual"), per_channel=("scale", "shift"))
def act_backward(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    act: str,
    alpha: float,
) -> torch.Tensor:
    """grad_out * act'(z), z = input * scale[c] + shift[c] (+ residual) recomputed in fp32: the gradient
    bn_act_apply's output passes to its normalization (and residual); in grad_out's dtype, input's format."""
    code = act_code("resnet_fused::triton_act_backward", act)
    fmt = _memory_format(input)
    g, x, res = _dense(grad_out, fmt), _dense(input, fmt), _dense(residual, fmt)
    grad = torch.empty_like(g, memory_format=fmt)
    if g.numel() == 0:
        return grad
    plan = _plan(x, fmt)
    _act_backward_kernel[(plan.num_p * triton.cdiv(plan.S, plan.block_s),)](
        g, x, _dense(scale), _dense(shift), res, grad, plan.P, plan.S, plan.C, float(alpha),
        ACT=code, CHANNELS_LAST=plan.channels_last, BLOCK_P=plan.block_p, BLOCK_S=plan.block_s,
    )
    return grad


@launcher("resnet_fused::triton_bn_act_backward_reduce", like=("input", "output"), per_channel=("mean",))
def bn_act_backward_reduce(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    mean: torch.Tensor,
    output: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum dy, sum dy * (x - mean)) per channel, fp32, where dy = grad_out, 0 where output <= 0."""
    fmt = _memory_format(input)
    x, g, y = _dense(input, fmt), _dense(grad_out, fmt), _dense(output, fmt)
    C = x.shape[1]
    if x.numel() == 0:
        return x.new_zeros(C, dtype=torch.float32), x.new_zeros(C, dtype=torch.float32)
    plan = _plan(x, fmt)
    chunk_s, num_chunks = plan.reduce_chunks()
    partials = torch.empty((2, plan.P // C * num_chunks, C), dtype=torch.float32, device=x.device)
    _bn_act_backward_reduce_kernel[(plan.num_p * num_chunks,)](
        g, x, _dense(mean), y, partials[0], partials[1], plan.P, plan.S, C, chunk_s,
        CHANNELS_LAST=plan.channels_last, BLOCK_P=plan.block_p, BLOCK_S=plan.block_s,
    )
    # Second level: (R, C) -> (C,) in fp32, R <= max(N, 1) * num_chunks is small.
    return partials[0].sum(0), partials[1].sum(0)


@launcher(
    "resnet_fused::triton_bn_act_backward_elemt",
    like=("output", "input"),
    per_channel=("mean", "dy_scale", "x_scale", "shift"),
    together=("input", "mean", "x_scale", "shift"),
)
def bn_act_backward_elemt(
    grad_out: torch.Tensor,
    output: torch.Tensor | None,
    input: torch.Tensor | None,
    mean: torch.Tensor | None,
    dy_scale: torch.Tensor,
    x_scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    need_grad_residual: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_input = dy * dy_scale[c] (+ (x - mean[c]) * x_scale[c] + shift[c]); grad_residual = dy (or empty)."""
    fmt = _memory_format(input if input is not None else grad_out)
    g, y, x = _dense(grad_out, fmt), _dense(output, fmt), _dense(input, fmt)
    grad_input = torch.empty_like(g, memory_format=fmt)
    grad_residual = torch.empty_like(g, memory_format=fmt) if need_grad_residual else grad_out.new_empty(0)
    if g.numel() == 0:
        return grad_input, grad_residual
    plan = _plan(g, fmt)
    _bn_act_backward_elemt_kernel[(plan.num_p * triton.cdiv(plan.S, plan.block_s),)](
        g, y, x, _dense(mean), _dense(dy_scale), _dense(x_scale), _dense(shift),
        grad_input, grad_residual if need_grad_residual else None, plan.P, plan.S, plan.C,
        CHANNELS_LAST=plan.channels_last, BLOCK_P=plan.block_p, BLOCK_S=plan.block_s,
    )
    return grad_input, grad_residual
