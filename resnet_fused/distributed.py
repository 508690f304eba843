"""bn_act with batch statistics synchronized across processes: nn.SyncBatchNorm's semantics on the
fused kernels. Each rank reduces its shard once; the per-channel (count, mean, M2) and, backward,
(sum dy, sum dy (x - mean)) travel through one collective each."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from resnet_fused import backends
from resnet_fused.reference import _memory_format


def _global_stats(mean: Tensor, var: Tensor, count: int, group) -> tuple[Tensor, Tensor, Tensor]:
    """Chan et al. across ranks, in fp64: (mean, biased var, count) of the union of all shards; the
    count stays a 0-dim fp64 tensor on the device (reading it on the host would sync every step)."""
    local = torch.stack([torch.full_like(mean, float(count)), mean, var * count]).double()  # (3, C): n, mean, M2
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    n, mu, m2 = torch.stack(gathered).unbind(1)  # (world, C) each
    total = n.sum(0)
    mean_all = (n * mu).sum(0) / total.clamp(min=1)
    m2_all = (m2 + n * (mu - mean_all).square()).sum(0)
    return mean_all.float(), (m2_all / total.clamp(min=1)).float(), total[0]


class SyncBnAct(torch.autograd.Function):
    """act(batch_norm(x) with statistics over every rank's batch + residual) -> (out, mean, var, count)."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, eps, relu, backend, group):
        from resnet_fused.functional import _scale_shift

        k = backends.kernels(backend)
        mean, var = k.bn_stats(input)
        mean, var, count = _global_stats(mean, var, input.numel() // input.shape[1], group)
        scale, shift = _scale_shift(mean, var, eps, weight, bias, mean.dtype, backend)
        out = k.bn_act_apply(input, scale, shift, residual, relu)
        ctx.save_for_backward(input, weight, out if relu else None, mean, var)
        ctx.eps, ctx.relu, ctx.backend, ctx.group, ctx.count = eps, relu, backend, group, count
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(mean, var, count)
        return out, mean, var, count

    @staticmethod
    def backward(ctx, grad_out, _mean, _var, _count):
        x, weight, out, mean, var = ctx.saved_tensors
        needs_x, needs_w, needs_b, needs_r = ctx.needs_input_grad[:4]
        k = backends.kernels(ctx.backend)
        grad_out = grad_out.contiguous(memory_format=_memory_format(x))
        invstd = torch.rsqrt(var.double() + ctx.eps)
        a = invstd if weight is None else invstd * weight.double()
        sum_dy, sum_dy_xmu = k.bn_act_backward_reduce(grad_out, x, mean, out)
        # weight / bias gradients stay local: DDP averages parameter gradients itself, as with SyncBatchNorm
        grad_weight = (sum_dy_xmu.double() * invstd).to(weight.dtype) if needs_w else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if needs_b else None
        grad_input = grad_residual = None
        if needs_x:
            sums = torch.stack([sum_dy, sum_dy_xmu]).double()
            dist.all_reduce(sums, group=ctx.group)
            b = -a * invstd.square() * sums[1] / ctx.count
            c = -a * sums[0] / ctx.count
            grad_input, masked = k.bn_act_backward_elemt(grad_out, out, x, mean, a.float(), b.float(), c.float(),
                                                         needs_r and ctx.relu)
            if needs_r and ctx.relu:
                grad_residual = masked
        elif needs_r and ctx.relu:
            grad_residual = torch.ops.aten.threshold_backward(grad_out, out, 0)
        if needs_r and not ctx.relu:
            grad_residual = grad_out
        return grad_input, grad_weight, grad_bias, grad_residual, None, None, None, None

