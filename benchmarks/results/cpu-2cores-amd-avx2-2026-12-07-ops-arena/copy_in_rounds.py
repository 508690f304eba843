"""Copy vs ops, all in one interleaved run (2 threads): the copy ceiling timed as the ops are. Run from the
repository root: PYTHONPATH=. python benchmarks/results/cpu-2cores-amd-avx2-2026-12-07-ops-arena/copy_in_rounds.py"""
import torch, time
from resnet_fused.bench.timing import time_cpu_interleaved
from resnet_fused.bench import ops
from resnet_fused.bench.ops import OpCase, _make_call
n_op = 32*256*56*56
src, dst = torch.ones(n_op), torch.zeros(n_op)
nb = 256 << 20 >> 2
bsrc, bdst = torch.ones(nb), torch.zeros(nb)
case = OpCase("add_relu", (32,256,56,56), torch.float32, True)
ar = _make_call(case, "cpu", torch.device("cpu"))
bn = _make_call(OpCase("bn_act eval", (32,256,56,56), torch.float32, True), "cpu", torch.device("cpu"))
ar(); bn()
t = time_cpu_interleaved({"copy_op": lambda: dst.copy_(src), "copy_256M": lambda: bdst.copy_(bsrc),
                          "add_relu": ar, "bn_eval": bn, "clone": lambda: src.clone()}, 3.0)
for k, v in t.items():
    nbytes = {"copy_op": 8*n_op, "copy_256M": 8*nb, "add_relu": 12*n_op, "bn_eval": 12*n_op, "clone": 8*n_op}[k]
    print(k, f"{v.median_ms:.2f} ms {nbytes/v.median_ms/1e6:.1f} GB/s")
print("cpu_copy_gbps", ops.cpu_copy_gbps(torch.get_num_threads(), 2.0))
