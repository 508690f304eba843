"""Which cuDNN fused graphs (the MLPerf ResNet data flow, issue 21) this GPU's cuDNN builds at the ResNet-18/50 conv shapes.

For every distinct conv of torchvision's resnet18 and resnet50 (224x224 input, batch --batch), and the stem with its
image padded to 8 channels (the tuner's cuda-padded candidate), in fp16 and bf16, channels_last, it builds the
cudnn-frontend graphs below and reports supported / unsupported with cuDNN's reason:

  conv+genstats          Y = conv(X), (sum Y, sum Y^2) per channel in the epilogue
  bnrelu+conv+genstats   Y = conv(relu(X * scale + bias)), the same statistics (the previous BN + ReLU on load;
                         not for the stem, whose input is the image); scale and bias in the io dtype
  bnrelu32+conv+genstats the same with fp32 scale and bias (the form csrc/cudnn/graphs.cpp tries first)
  conv+reduce            conv+genstats with the statistics taken by two reduction nodes, sum Y and sum Y * Y to
  bnrelu+conv+reduce     (1, K, 1, 1) (the generic runtime-fusion engine; csrc/cudnn/graphs.cpp tries these where
                         genstats has no engine: bf16 on Hopper)

With --time it runs each supported graph and, beside it, what the cuda backend runs today for the same result
(cuDNN conv through aten, then our bn_stats kernel; with the prologue, bn_act_apply first): CUDA-event medians.
Needs a GPU and cudnn-frontend's Python module (`pip install nvidia-cudnn-frontend`, or the wheels
benchmarks/fetch_gpu_wheels.sh downloads); exits 3 saying which is missing otherwise.

    python benchmarks/cudnn_graphs_probe.py [--batch 256] [--time] [--deadline SECONDS] [--patterns P,..] [--dtypes D,..]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torchvision

PATTERNS = ("conv+genstats", "bnrelu+conv+genstats", "bnrelu32+conv+genstats", "conv+reduce", "bnrelu+conv+reduce")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resnet_convs() -> list[dict]:
    """The distinct convs of resnet18 and resnet50 at 224x224: channels, kernel, stride, padding, input H x W, and
    the models they occur in (read off forward hooks, batch 1, on the CPU)."""
    convs: dict[tuple, dict] = {}
    for name in ("resnet18", "resnet50"):
        model = getattr(torchvision.models, name)().eval()

        def hook(conv, inputs, _out, model_name=name):
            h, w = inputs[0].shape[2:]
            key = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, (h, w))
            entry = convs.setdefault(key, {"cin": conv.in_channels, "cout": conv.out_channels, "kernel": conv.kernel_size,
                                           "stride": conv.stride, "padding": conv.padding, "hw": (h, w), "models": []})
            if model_name not in entry["models"]:
                entry["models"].append(model_name)

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            model(torch.zeros(1, 3, 224, 224))
        for h in handles:
            h.remove()
    found = list(convs.values())
    for c in found:
        c["image"] = c["cin"] == 3
    # the stem as the tuner's cuda-padded candidate runs it: the image zero-padded to 8 channels (resnet_fused.ops.cudnn
    # padded_channels), which genstats' engines may take where they decline 3 channels
    return found + [{**c, "cin": 8, "models": ["stem, padded"]} for c in found if c["image"]]


def conv_label(c: dict) -> str:
    k, s = c["kernel"], c["stride"]
    return f"{c['cin']}->{c['cout']} {k[0]}x{k[1]}/{s[0]} @{c['hw'][0]}x{c['hw'][1]}"


class Probe:
    """One pattern at one conv shape and dtype: the graph built (or why not), its tensors, and how to run it."""

    def __init__(self, cudnn, handle, c: dict, batch: int, dtype: torch.dtype, pattern: str):
        self.cudnn, self.handle, self.c, self.pattern = cudnn, handle, c, pattern
        cl = torch.channels_last
        self.x = torch.randn(batch, c["cin"], *c["hw"], device="cuda", dtype=dtype).contiguous(memory_format=cl)
        self.w = (torch.randn(c["cout"], c["cin"], *c["kernel"], device="cuda", dtype=dtype) * 0.05).contiguous(memory_format=cl)
        coeff = torch.float32 if pattern.startswith("bnrelu32+") else dtype  # scale and bias
        self.scale = (torch.rand(1, c["cin"], 1, 1, device="cuda", dtype=coeff) + 0.5).contiguous(memory_format=cl)
        self.bias = (torch.randn(1, c["cin"], 1, 1, device="cuda", dtype=coeff) * 0.1).contiguous(memory_format=cl)
        out_hw = [(n + 2 * p - k) // s + 1 for n, p, k, s in zip(c["hw"], c["padding"], c["kernel"], c["stride"])]
        self.y = torch.empty(batch, c["cout"], *out_hw, device="cuda", dtype=dtype).contiguous(memory_format=cl)
        self.sum = torch.empty(1, c["cout"], 1, 1, device="cuda", dtype=torch.float32).contiguous(memory_format=cl)
        self.sq_sum = torch.empty_like(self.sum)
        for t in (self.y, self.sum, self.sq_sum):  # poisoned: a graph that leaves an output unwritten, or adds to what
            t.fill_(float("nan"))                  # it holds (a reduction's accumulate), shows as NaN in check()
        self.graph, self.error, self.build_s = None, None, 0.0
        t0 = time.perf_counter()
        try:
            self._build(dtype)
        except Exception as e:  # cuDNN's reason: not supported on this GPU / dtype / shape, or a build failure
            self.graph, self.error = None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        self.build_s = time.perf_counter() - t0

    def _build(self, dtype: torch.dtype):
        cudnn, c = self.cudnn, self.c
        io = cudnn.data_type.HALF if dtype == torch.float16 else cudnn.data_type.BFLOAT16
        g = cudnn.pygraph(io_data_type=io, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=self.handle)
        X = g.tensor(name="X", dim=self.x.size(), stride=self.x.stride(), data_type=io)
        W = g.tensor(name="W", dim=self.w.size(), stride=self.w.stride(), data_type=io)
        self.tensors = {X: self.x, W: self.w}
        image = X
        if self.pattern.startswith("bnrelu"):
            coeff = cudnn.data_type.FLOAT if self.scale.dtype == torch.float32 else io
            S = g.tensor(name="S", dim=self.scale.size(), stride=self.scale.stride(), data_type=coeff)
            B = g.tensor(name="B", dim=self.bias.size(), stride=self.bias.stride(), data_type=coeff)
            self.tensors.update({S: self.scale, B: self.bias})
            image = g.relu(name="relu", input=g.bias(name="bias", input=g.scale(name="scale", input=X, scale=S), bias=B))
        Y = g.conv_fprop(image=image, weight=W, padding=list(c["padding"]), stride=list(c["stride"]), dilation=[1, 1])
        Y.set_output(True).set_data_type(io)
        if self.pattern.endswith("+genstats"):
            SUM, SQ_SUM = g.genstats(name="genstats", input=Y)
        else:  # the sums over (N, H, W), to the (1, K, 1, 1) shape of the outputs
            add, f32 = cudnn.reduction_mode.ADD, cudnn.data_type.FLOAT
            SUM = g.reduction(input=Y, mode=add, compute_data_type=f32, name="sum")
            SQ_SUM = g.reduction(input=g.mul(a=Y, b=Y, name="square"), mode=add, compute_data_type=f32, name="sum_sq")
            for t in (SUM, SQ_SUM):
                t.set_dim(list(self.sum.size())).set_stride(list(self.sum.stride()))
        SUM.set_output(True).set_data_type(cudnn.data_type.FLOAT)
        SQ_SUM.set_output(True).set_data_type(cudnn.data_type.FLOAT)
        self.tensors.update({Y: self.y, SUM: self.sum, SQ_SUM: self.sq_sum})
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.workspace = torch.empty(g.get_workspace_size(), device="cuda", dtype=torch.uint8)
        self.graph = g

    def run_graph(self):
        self.graph.execute(self.tensors, self.workspace, handle=self.handle)

    def run_today(self):
        """What the cuda backend runs for the same result today: (bn_act_apply,) aten's conv, bn_stats."""
        x = self.x
        if self.pattern.startswith("bnrelu"):
            x = torch.ops.resnet_fused.bn_act_apply(x, self.scale.view(-1).float(), self.bias.view(-1).float(), None, "relu", 0.0)
        c = self.c
        y = torch.nn.functional.conv2d(x, self.w, None, c["stride"], c["padding"])
        return torch.ops.resnet_fused.bn_stats(y)

    def check(self) -> str:
        """The graph's statistics against float64 sums of its own output (max relative error)."""
        y = self.y.double()
        exp_sum, exp_sq = y.sum((0, 2, 3)), y.square().sum((0, 2, 3))
        rel = lambda got, exp: ((got.view(-1).double() - exp).abs().max() / exp.abs().max().clamp_min(1e-30)).item()
        line = f"stats rel err sum {rel(self.sum, exp_sum):.1e} sq {rel(self.sq_sum, exp_sq):.1e}"
        if not all(t.isfinite().all() for t in (self.y, self.sum, self.sq_sum)):
            line += " (NaN left: an output not written, or added to)"
        return line


def median_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--time", action="store_true", help="run each supported graph and today's path, CUDA-event medians")
    ap.add_argument("--deadline", type=float, default=float("inf"), help="seconds; start no new shape after it")
    ap.add_argument("--patterns", default=",".join(PATTERNS), help=f"comma-separated, of {', '.join(PATTERNS)}")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, of {', '.join(DTYPES)}")
    args = ap.parse_args(argv)
    patterns, dtypes = args.patterns.split(","), args.dtypes.split(",")
    unknown = sorted(set(patterns) - set(PATTERNS)) + sorted(set(dtypes) - set(DTYPES))
    if unknown:
        ap.error(f"unknown pattern or dtype {unknown}: patterns are {', '.join(PATTERNS)}; dtypes {', '.join(DTYPES)}")
    if not torch.cuda.is_available():
        print("cudnn_graphs_probe: no CUDA GPU here; nothing to probe", file=sys.stderr)
        return 3
    try:
        import cudnn
    except ImportError as e:
        print(f"cudnn_graphs_probe: cudnn-frontend's Python module is not installed ({e}); "
              "pip install nvidia-cudnn-frontend, or the wheels of benchmarks/fetch_gpu_wheels.sh", file=sys.stderr)
        return 3
    if args.time:
        import resnet_fused  # noqa: F401  (the resnet_fused ops today's path runs)
    print(f"GPU {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
          f"cuDNN {cudnn.backend_version_string()} (torch's {torch.backends.cudnn.version()}), "
          f"cudnn-frontend {getattr(cudnn, '__version__', '?')}, torch {torch.__version__}, batch {args.batch}, channels_last")
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    t0, supported, total = time.perf_counter(), 0, 0
    for c in resnet_convs():
        if time.perf_counter() - t0 > args.deadline:
            print(f"deadline: stopped before {conv_label(c)}")
            break
        for dname in dtypes:
            dtype = DTYPES[dname]
            for pattern in patterns:
                if pattern.startswith("bnrelu") and c["image"]:
                    continue  # the stem's input is the image: no BN before it
                p = Probe(cudnn, handle, c, args.batch, dtype, pattern)
                total += 1
                line = f"{conv_label(c):28s} {'+'.join(c['models']):17s} {dname} {pattern:22s} "
                if p.graph is None:
                    print(line + f"unsupported ({p.build_s:.2f} s): {p.error}", flush=True)
                    continue
                supported += 1
                line += f"supported (built in {p.build_s:.2f} s)"
                if args.time:
                    try:
                        graph_ms, today_ms = median_ms(p.run_graph), median_ms(p.run_today)
                        line += f"  graph {graph_ms:.3f} ms, today {today_ms:.3f} ms ({today_ms / graph_ms:.2f}x); {p.check()}"
                    except Exception as e:  # a graph that builds and then fails to run is a finding too
                        line += f"  execution failed: {type(e).__name__}: {str(e).strip()[:200]}"
                print(line, flush=True)
                del p
        torch.cuda.empty_cache()
    print(f"{supported} of {total} graphs supported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
