"""Chan et al.'s combine of per-channel (count, mean, M2 = sum (x - mean)^2) statistics, shared by the
BN statistics kernels (bn_act.py) and the merge of the convolution's epilogue statistics (conv.py)."""

import triton
import triton.language as tl


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
