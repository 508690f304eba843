"""bn_act with batch statistics synchronized across processes: nn.SyncBatchNorm's semantics on the
fused kernels. Each rank reduces its shard once; the per-channel (count, mean, M2) and, backward,
(sum dy, sum dy (x - mean)) travel through one collective each."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from resnet_fused.ops._bn_math import bn_act_grads, save_for_bn_act_grads
from resnet_fused.ops.kernels import kernels


def global_stats(mean: Tensor, var: Tensor, count: int, group) -> tuple[Tensor, Tensor, Tensor]:
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
    def forward(ctx, input, weight, bias, residual, eps, act, backend, group):
        k = kernels(backend)
        mean, var = k.bn_stats(input)
        mean, var, count = global_stats(mean, var, input.numel() // input.shape[1], group)
        scale, shift = k.bn_scale_shift(mean, var, weight, bias, eps)
        out = k.bn_act_apply(input, scale, shift, residual, act.name, act.alpha)
        save_for_bn_act_grads(ctx, act, input, weight, bias, residual, out, mean, var)
        ctx.eps, ctx.backend, ctx.group, ctx.count = eps, backend, group, count
        ctx.mark_non_differentiable(mean, var, count)
        return out, mean, var, count

    @staticmethod
    def backward(ctx, grad_out, _mean, _var, _count):
        x, weight, out, mean, var, bias, residual = ctx.saved_tensors
        grads = bn_act_grads(ctx.backend, grad_out, x, out, mean, var, weight, ctx.eps, ctx.act, True,
                             tuple(ctx.needs_input_grad[:4]), ctx.bias_dtype, sync=(ctx.group, ctx.count), bias=bias,
                             residual=residual)
        return (*grads, None, None, None, None)
