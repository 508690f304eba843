"""Host time per block call, fused vs eager: torchvision BasicBlock (1x8x4x4) and Bottleneck (1x32x4x4), eval
(no_grad forward) and train (forward + backward, and the backward alone), 1 thread, tiny inputs so that the kernels
cost almost nothing; median of 7 rounds x 200 calls, fused and eager alternating in one process.

    python benchmarks/host_time_blocks.py
"""
import copy
import statistics
import time

import torch
import torchvision

import resnet_fused

ROUNDS, CALLS, WARMUP = 7, 200, 50


def make_block(kind):
    torch.manual_seed(0)
    if kind == "basic":
        return torchvision.models.resnet.BasicBlock(8, 8), (1, 8, 4, 4)
    return torchvision.models.resnet.Bottleneck(32, 8), (1, 32, 4, 4)


def eval_call(block, x):
    def call():
        with torch.no_grad():
            block(x)
    return call


def train_call(block, x, grad):
    def call():
        block(x).backward(grad)
    return call


def median_us(fn, rounds):
    """Per-call microseconds of each round; rounds are interleaved by the caller."""
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    rounds.append((time.perf_counter() - start) / CALLS * 1e6)


def backward_us(block, x, grad):
    """Median per-call microseconds of the backward alone (forward outside the timed region)."""
    times = []
    for _ in range(ROUNDS):
        total = 0.0
        for _ in range(CALLS):
            out = block(x)
            start = time.perf_counter()
            out.backward(grad)
            total += time.perf_counter() - start
        times.append(total / CALLS * 1e6)
    return statistics.median(times)


def main():
    torch.set_num_threads(1)
    for kind in ("basic", "bottleneck"):
        for train in (False, True):
            eager, shape = make_block(kind)
            fused = copy.deepcopy(eager)
            resnet_fused.fuse_(fused)
            eager.train(train)
            fused.train(train)
            x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(train)
            grad = torch.randn_like(x)
            blocks = {"eager": eager, "fused": fused}
            calls = {k: train_call(b, x, grad) if train else eval_call(b, x) for k, b in blocks.items()}
            for call in calls.values():
                for _ in range(WARMUP):
                    call()
            rounds = {k: [] for k in calls}
            for _ in range(ROUNDS):
                for k, call in calls.items():
                    median_us(call, rounds[k])
            me, mf = statistics.median(rounds["eager"]), statistics.median(rounds["fused"])
            line = f"{kind:10s} {'train' if train else 'eval':5s} eager {me:7.1f} us  fused {mf:7.1f} us  ratio {mf / me:.2f}"
            if train:
                be, bf = backward_us(eager, x, grad), backward_us(fused, x, grad)
                line += f"   backward: eager {be:6.1f} us  fused {bf:6.1f} us  ratio {bf / be:.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
