"""The benchmark harness: a tiny run writes well-formed JSON/CSV; the byte counts are the floor."""

import csv
import json

import pytest
import torch

from resnet_fused.bench import __main__ as bench
from resnet_fused.bench.convs import RESNET50_CONVS, ConvShape
from resnet_fused.bench.ops import OpCase


def test_bytes_moved_are_the_floor():
    shape = (2, 3, 4, 5)  # 120 elements
    assert OpCase("add_relu", shape, torch.float32, True).bytes_moved() == 3 * 120 * 4  # read x, r; write out
    assert OpCase("bn_act eval", shape, torch.bfloat16, False).bytes_moved() == 3 * 120 * 2
    # forward 3 + backward: read grad_out, x, out; write grad_x, grad_residual
    assert OpCase("bn_act train+bwd", shape, torch.float16, True).bytes_moved() == 8 * 120 * 2


def test_conv_flops_and_shapes():
    """The suite's shapes are exactly torchvision resnet50's distinct convolutions (a shape appears
    twice only with different epilogues: layer1's conv3 and projection), and each one's FLOP count
    is what torch's FlopCounterMode counts for it."""
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    seen = {}

    def record(conv, inputs, _):
        x = inputs[0]
        key = (conv.in_channels, x.shape[-1], conv.out_channels, conv.kernel_size[0], conv.stride[0])
        with FlopCounterMode(display=False) as counter:
            conv._conv_forward(x, conv.weight, conv.bias)  # not conv(x): that would call this hook again
        seen[key] = counter.get_total_flops()

    model = torchvision.models.resnet50()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(record)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    ours = {(s.cin, s.hw, s.cout, s.kernel, s.stride): s for s in RESNET50_CONVS}  # duplicates collapse
    assert set(ours) == set(seen)
    assert len({(s.cin, s.hw, s.cout, s.kernel, s.stride, s.residual, s.relu) for s in RESNET50_CONVS}) == len(RESNET50_CONVS)
    for key, flops in seen.items():
        assert ours[key].flops(1) == flops, ours[key].name
    stem = ConvShape("stem", 3, 224, 64, 7, 2)
    assert stem.out_hw == 112 and stem.flops(2) == 2 * 2 * 112 * 112 * 64 * 3 * 49


FLOPS_OF = {s.name: s.flops(1) for s in RESNET50_CONVS}  # batch 1, forward


def test_convs_suite_counts_training_flops_three_times():
    from resnet_fused.bench import convs

    shape = ConvShape("tiny", 4, 6, 8, 3)
    rows = convs.run([shape], 1, [torch.float32], convs.MODES, torch.device("cpu"), [], True, progress=lambda: None)
    assert {r["mode"] for r in rows} == set(convs.MODES)
    for r in rows:  # forward; training adds the input and the weight gradients, each a forward's worth
        assert r["flops"] == (3 if r["mode"] == "training" else 1) * shape.flops(1) == (3 if r["mode"] == "training" else 1) * 2 * 36 * 8 * 4 * 9


def test_quick_run_writes_results(tmp_path, capsys):
    bench.main(["--quick", "--batch", "1", "--no-compile", "--out", str(tmp_path)])  # compile: test_models_providers
    data = json.loads((tmp_path / "results.json").read_text())
    env, rows = data["environment"], data["results"]
    for key in ("device", "torch", "triton", "date", "command"):
        assert key in env
    assert {r["suite"] for r in rows} == {"ops", "convs", "blocks", "models"}
    assert {r["op"] for r in rows if r["suite"] == "ops"} == {"bn_act eval", "bn_act train", "bn_act train+bwd", "add_relu"}
    for r in rows:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["speedup_vs_eager"] > 0
        if r["suite"] == "ops":
            assert abs(r["gbps"] - r["bytes"] / r["median_ms"] / 1e6) < 1e-6 * r["gbps"]
        if r["suite"] == "convs":
            assert abs(r["tflops"] - r["flops"] / r["median_ms"] / 1e9) < 1e-6 * r["tflops"] and r["matmul_tflops"] > 0
            assert r["flops"] == {"inference": 1, "training fwd": 1, "training": 3}[r["mode"]] * FLOPS_OF[r["case"]]
        if r["suite"] == "models":
            assert abs(r["images_per_s"] - 1 / r["median_ms"] * 1e3) < 1e-6 * r["images_per_s"]
    assert {(r["provider"], r["mode"]) for r in rows if r["suite"] == "blocks"} >= {("eager", "inference"), ("fused-cpu", "training")}
    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and csv_rows[0]["device"] == env["device"]
    assert {r["provider"] for r in rows if r["suite"] == "convs"} == {"conv only", "eager", "fused-cpu", "tuned"}
    tuned = [r for r in rows if r["provider"] == "tuned"]
    assert {r["suite"] for r in tuned} == {"convs", "blocks", "models"} and all(r["tuning_s"] > 0 for r in tuned)
    for suite in ("ops", "convs", "blocks", "models"):
        png = (tmp_path / f"{suite}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert "vs eager" in capsys.readouterr().out


def test_models_providers():
    """The models suite's CPU providers: eager both layouts, fused, tuned; with --compile also compile,
    compile with freezing (eval) and compile of the fused model; the inference engines (eval) when installed."""
    from resnet_fused.bench import anchors, models

    cpu = torch.device("cpu")
    assert models.providers(cpu, [], training=True) == ["eager", "eager-nchw", "fused-cpu", "tuned"]
    assert models.providers(cpu, ["default"], training=True) == ["eager", "eager-nchw", "compile-fused", "compile-default",
                                                                 "fused-cpu", "tuned"]
    assert models.providers(cpu, ["default"], training=False) == ["eager", "eager-nchw", "compile-freezing", "compile-fused",
                                                                  *anchors.available(), "compile-default", "fused-cpu", "tuned"]


def test_main_job_compares_against_compile_by_default():
    assert bench.parse_args([]).no_compile is False
    args = bench.parse_args(["--no-compile"])
    assert args.no_compile


@pytest.mark.parametrize("engine", ["ort", "openvino"])
def test_anchor_runs_the_model_and_is_checked(engine):
    """An inference engine runs the exported model and its output is checked against eager before timing;
    one that computes something else is refused."""
    from resnet_fused.bench import anchors

    if engine not in anchors.available():
        pytest.skip(f"{engine} is not installed (the `anchors` extra)")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 9, 9)
    run = anchors.runner(engine, model, x)
    anchors.check_output(engine, torch.as_tensor(run()), model, x)  # a second run, within the same float64 bound
    with pytest.raises(RuntimeError, match="output differs"):
        anchors.check_output(engine, torch.as_tensor(run()) + 1e-2, model, x)
