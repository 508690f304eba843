"""fuse_(sync_bn=True) under DistributedDataParallel: 2 processes (gloo, CPU) on halves of a batch give
what one process gives on the whole batch (outputs, gradients, running statistics)."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn

import resnet_fused
from helpers import assert_within_eager_error

WORLD = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    block = torchvision.models.resnet.BasicBlock
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         block(8, 8), block(8, 16, stride=2, downsample=down),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def _worker(rank: int, init_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(1)
        x, g = torch.randn(8, 3, 12, 12), torch.randn(8, 5)
        eager = _model().train()
        exact = copy.deepcopy(eager).double()  # the float64 twin: the yardstick of both (eager-error rule)
        fused = resnet_fused.fuse_(copy.deepcopy(eager), sync_bn=True)
        assert len(fused.resnet_fused_report.swapped) == 3, fused.resnet_fused_report
        ddp = nn.parallel.DistributedDataParallel(fused)
        shard = slice(rank * 4, (rank + 1) * 4)
        for step in range(2):
            eager.zero_grad(), ddp.zero_grad(), exact.zero_grad()
            out_eager, out = eager(x * (step + 1)), ddp(x[shard] * (step + 1))
            out_exact = exact(x.double() * (step + 1))
            out_eager.backward(g)
            out.backward(g[shard])
            out_exact.backward(g.double())
            assert_within_eager_error(out, out_eager[shard], out_exact[shard], f"step {step}: output", norm="fro")
            for (name, p), q, r in zip(fused.named_parameters(), eager.parameters(), exact.parameters()):
                # DDP averages the ranks' gradients; the one-process loss sums over both halves
                assert_within_eager_error(p.grad * WORLD, q.grad, r.grad, f"step {step}: grad {name}", norm="fro")
            for (name, b), c, d in zip(fused.named_buffers(), eager.buffers(), exact.buffers()):
                if b.is_floating_point():
                    assert_within_eager_error(b, c, d, f"step {step}: {name}", norm="fro")
                else:
                    assert torch.equal(b, c), f"step {step}: {name}"
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sync_bn_under_ddp_equals_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
