"""Chan et al.'s combine of per-channel (count, mean, M2 = sum (x - mean)^2) statistics, and the merge
of per-tile partials into (mean, var): shared by bn_stats (bn_act.py) and the convolution's epilogue
statistics (conv.py)."""

import torch
import triton
import triton.language as tl

MERGE_BLOCK_R = 64  # statistics merge: partial rows per step,
MERGE_ROWS = 4 * MERGE_BLOCK_R  # rows per program (a tree of fan-in 256),
MERGE_MAX_BLOCK_C = 32  # and channels per program


@triton.jit
def chan_merge(n, mean, m2, n_t, mean_t, m2_t):
    """Running (n, mean, M2) merged with a block's (n_t, mean_t, M2_t), d = mean_t - mean:
    n' = n + n_t,  mean' = mean + d * n_t / n',  M2' = M2 + M2_t + d^2 * n * n_t / n'.
    Lanes that saw no values keep n = 0: max(n', 1) avoids 0 / 0."""
    n_new = n + n_t
    d = tl.maximum(n_new, 1.0)
    delta = mean_t - mean
    return n_new, mean + delta * (n_t / d), m2 + m2_t + delta * delta * (n * n_t / d)


@triton.jit
def reduce_partials(n_i, mean_i, m2_i):
    """(n_t, mean_t, M2_t) of a (BLOCK_R, BLOCK_C) block of partial rows, per column (channel):
    n_t = sum n_i,  mean_t = sum n_i mean_i / n_t,  M2_t = sum M2_i + n_i (mean_i - mean_t)^2."""
    n_t = tl.sum(n_i, axis=0)
    mean_t = tl.sum(n_i * mean_i, axis=0) / tl.maximum(n_t, 1.0)  # max(): columns past C have n = 0
    d_i = mean_i - mean_t[None, :]
    return n_t, mean_t, tl.sum(m2_i + n_i * d_i * d_i, axis=0)


@triton.jit
def _merge_kernel(
    in_ptr, in_plane,  # planes (count, mean, M2) of (R, C) partials, fp32, in_plane elements apart
    out_count_ptr, out_mean_ptr, out_m2_ptr,  # fp32 (cdiv(R, ROWS), C) each; out_count_ptr None: the last level
    R, C, ROWS,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program (j, channel block) merges partial rows [j*ROWS, (j+1)*ROWS) per channel, BLOCK_R rows at
    # a time in a fixed order (deterministic). A block of rows i is first reduced on its own,
    #   n_t = sum n_i,  mean_t = sum n_i mean_i / n_t,  M2_t = sum M2_i + n_i (mean_i - mean_t)^2,
    # then merged into the running stats with Chan's formula, d = mean_t - mean:
    #   n' = n + n_t,  mean' = mean + d * n_t / n',  M2' = M2 + M2_t + d^2 * n * n_t / n'.
    # Writes row j of (count, mean, M2); the last level (one row, out_count_ptr None) writes mean and,
    # to out_m2_ptr, var = M2 / n (biased). Lanes past C keep n = 0 (max(., 1) avoids 0 / 0).
    j = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_end = tl.minimum(j * ROWS + ROWS, R)
    n = tl.zeros((BLOCK_C,), tl.float32)
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for r0 in range(j * ROWS, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < r_end)[:, None] & (c < C)[None, :]
        offs = r[:, None].to(tl.int64) * C + c[None, :]
        n_i = tl.load(in_ptr + offs, mask=mask, other=0.0)
        mean_i = tl.load(in_ptr + in_plane + offs, mask=mask, other=0.0)
        m2_i = tl.load(in_ptr + 2 * in_plane + offs, mask=mask, other=0.0)
        n, mean, m2 = chan_merge(n, mean, m2, *reduce_partials(n_i, mean_i, m2_i))
    offs = j.to(tl.int64) * C + c
    tl.store(out_mean_ptr + offs, mean, mask=c < C)
    if out_count_ptr is None:
        tl.store(out_m2_ptr + offs, m2 / tl.maximum(n, 1.0), mask=c < C)
    else:
        tl.store(out_count_ptr + offs, n, mask=c < C)
        tl.store(out_m2_ptr + offs, m2, mask=c < C)


def merge_stats(partials: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased var), fp32 (C,) each, of rows [0, R) of partials (3, >= R, C): planes
    (count, mean, M2). A tree of merges, fan-in MERGE_ROWS rows per program, each level one 2-D grid
    (row chunks x channel blocks); the last level (one chunk) writes mean and var."""
    C = partials.shape[2]
    block_c = min(triton.next_power_of_2(C), MERGE_MAX_BLOCK_C)
    while True:
        chunks = triton.cdiv(R, MERGE_ROWS)
        # the last level's mean and var: two allocations (an op's outputs must not alias each other)
        merged = partials.new_empty((3, chunks, C)) if chunks > 1 else (None, partials.new_empty(C), partials.new_empty(C))
        _merge_kernel[(chunks, triton.cdiv(C, block_c))](
            partials, partials.stride(0), *merged, R, C, MERGE_ROWS, BLOCK_R=MERGE_BLOCK_R, BLOCK_C=block_c,
        )
        if chunks == 1:
            return merged[1], merged[2]
        partials, R = merged, chunks
