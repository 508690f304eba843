"""The benchmark harness: a tiny run writes well-formed JSON/CSV; the byte counts are the floor."""

import csv
import json

import torch

from resnet_fused.bench import __main__ as bench
from resnet_fused.bench.ops import OpCase


def test_bytes_moved_are_the_floor():
    shape = (2, 3, 4, 5)  # 120 elements
    assert OpCase("add_relu", shape, torch.float32, True).bytes_moved() == 3 * 120 * 4  # read x, r; write out
    assert OpCase("bn_act eval", shape, torch.bfloat16, False).bytes_moved() == 3 * 120 * 2
    # forward 3 + backward: read grad_out, x, out; write grad_x, grad_residual
    assert OpCase("bn_act train+bwd", shape, torch.float16, True).bytes_moved() == 8 * 120 * 2


def test_quick_run_writes_results(tmp_path, capsys):
    bench.main(["--quick", "--batch", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    env, rows = data["environment"], data["results"]
    for key in ("device", "torch", "triton", "date", "command"):
        assert key in env
    assert {r["suite"] for r in rows} == {"ops", "blocks", "models"}
    assert {r["op"] for r in rows if r["suite"] == "ops"} == {"bn_act eval", "bn_act train", "bn_act train+bwd", "add_relu"}
    for r in rows:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["speedup_vs_eager"] > 0
        if r["suite"] == "ops":
            assert abs(r["gbps"] - r["bytes"] / r["median_ms"] / 1e6) < 1e-6 * r["gbps"]
        if r["suite"] == "models":
            assert abs(r["images_per_s"] - 1 / r["median_ms"] * 1e3) < 1e-6 * r["images_per_s"]
    assert {(r["provider"], r["mode"]) for r in rows if r["suite"] == "blocks"} >= {("eager", "inference"), ("fused-cpu", "training")}
    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and csv_rows[0]["device"] == env["device"]
    for suite in ("ops", "blocks", "models"):
        png = (tmp_path / f"{suite}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert "vs eager" in capsys.readouterr().out
