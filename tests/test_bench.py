"""The benchmark harness: a tiny run writes well-formed JSON/CSV; the byte counts are the floor; rows are
written as they are measured, a failing provider is an error row, a deadline stops a run cleanly."""

import csv
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from resnet_fused import backends, tuning
from resnet_fused.bench import __main__ as bench
from resnet_fused.bench import rows as bench_rows
from resnet_fused.bench.convs import RESNET50_CONVS, ConvShape
from resnet_fused.bench.ops import OpCase, _make_call
from resnet_fused.ops import arena


def test_bytes_moved_are_the_floor():
    shape = (2, 3, 4, 5)  # 120 elements
    assert OpCase("add_relu", shape, torch.float32, True).bytes_moved() == 3 * 120 * 4  # read x, r; write out
    assert OpCase("bn_act eval", shape, torch.bfloat16, False).bytes_moved() == 3 * 120 * 2
    # forward 3 + backward: read grad_out, x, out; write grad_x, grad_residual
    assert OpCase("bn_act train+bwd", shape, torch.float16, True).bytes_moved() == 8 * 120 * 2


@pytest.mark.parametrize("name", ["bn_act eval", "bn_act train+bwd", "add_relu"])
@pytest.mark.parametrize("provider", ["eager", "cpu"])
def test_cpu_ops_are_timed_in_the_arena(name, provider):
    """The ops suite times CPU kernels, not page faults: every provider's outputs (and in the backward its
    gradients) come from the arena and go back to it when freed."""
    if arena._arena() is None or (provider == "cpu" and not backends.available()["cpu"]):
        pytest.skip("no arena or no cpu backend in this build")
    case = OpCase(name, (2, 16, 32, 32), torch.float32, True)  # 128 KiB per activation, above the arena's minimum
    call = _make_call(case, provider, torch.device("cpu"))
    arena.empty_cache()
    out = call()
    del out
    assert arena.cached_bytes() >= 2 * 16 * 32 * 32 * 4


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


def test_convs_suite_counts_training_flops_three_times(tmp_path):
    from resnet_fused.bench import convs

    shape = ConvShape("tiny", 4, 6, 8, 3)
    rec = bench_rows.Recorder(str(tmp_path / "rows.jsonl"), {})
    convs.run([shape], 1, [torch.float32], convs.MODES, torch.device("cpu"), [], True, rec)
    rows = rec.rows
    assert {r["mode"] for r in rows} == set(convs.MODES)
    for r in rows:  # forward; training adds the input and the weight gradients, each a forward's worth
        assert r["flops"] == (3 if r["mode"] == "training" else 1) * shape.flops(1) == (3 if r["mode"] == "training" else 1) * 2 * 36 * 8 * 4 * 9


def test_quick_run_writes_results(tmp_path, capsys):
    bench.main(["--quick", "--batch", "1", "--no-compile", "--out", str(tmp_path)])  # compile: test_models_providers
    data = json.loads((tmp_path / "results.json").read_text())
    env, rows = data["environment"], data["results"]
    for key in ("device", "torch", "triton", "date", "command"):
        assert key in env
    assert {r["suite"] for r in rows} == {"ops", "convs", "blocks", "models", "overhead"}
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
    env_, rows_, end = bench_rows.read(str(tmp_path / "rows.jsonl"))  # the same rows, as they were measured
    assert (env_, rows_, end) == (env, rows, "complete") and "stopped" not in data
    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and csv_rows[0]["device"] == env["device"]
    assert {r["provider"] for r in rows if r["suite"] == "convs"} == {"conv only", "eager", "fused-cpu", "tuned"}
    tuned = [r for r in rows if r["provider"] == "tuned"]
    assert {r["suite"] for r in tuned} == {"convs", "blocks", "models"} and all(r["tuning_s"] > 0 for r in tuned)
    candidates = {c.name for c in tuning.candidates(torch.device("cpu"), False, False) + tuning.candidates(
        torch.device("cpu"), True, True)}
    for r in tuned:  # what the tuner chose, named: "layer: candidate" (convs, blocks), "candidate count" (models)
        named = {part.split(": ")[-1].split(" ")[0] for part in re.split("; |, ", r["tuned_choice"])}
        assert r["tuned_choice"] and named <= candidates, r["tuned_choice"]
    for suite in ("ops", "convs", "blocks", "models"):
        png = (tmp_path / f"{suite}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert "vs eager" in capsys.readouterr().out


def _overhead_rows(tmp_path, compile_modes):
    from resnet_fused.bench import overhead

    rec = bench_rows.Recorder(str(tmp_path / "rows.jsonl"), {})
    overhead.run(["BasicBlock"], [torch.float32], torch.device("cpu"), compile_modes, True, rec)
    return rec.rows


def test_overhead_suite_rows(tmp_path):
    """BasicBlock only: every provider in both modes has a host time (per call, in us) and an op count;
    no kernel launches on the CPU; the thread count is restored after the one-thread measurement."""
    threads = torch.get_num_threads()
    rows = _overhead_rows(tmp_path, ["default"])
    assert torch.get_num_threads() == threads
    assert {(r["mode"], r["provider"]) for r in rows} == {
        (m, p) for m in ("inference", "training") for p in ("eager", "compile-default", "fused-cpu")}
    for r in rows:
        assert "error" not in r, r
        assert r["host_us"] > 0 and r["host_us"] == r["median_ms"] * 1e3 and r["speedup_vs_eager"] > 0
        assert isinstance(r["aten_ops"], int) and r["aten_ops"] > 0 and r["launches"] is None
    assert "us, " in bench.format_table(rows) and " ops" in bench.format_table(rows)


def test_overhead_op_counts_are_deterministic(tmp_path):
    counts = [{(r["mode"], r["provider"]): r["aten_ops"] for r in _overhead_rows(tmp_path / d, [])} for d in "ab"]
    assert set(counts[0]) == {(m, p) for m in ("inference", "training") for p in ("eager", "fused-cpu")}
    assert counts[0] == counts[1]


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


@pytest.mark.parametrize("engine, dtype", [("ort", torch.float32), ("openvino", torch.float32),
                                           ("openvino", torch.bfloat16)])
def test_anchor_runs_the_model_and_is_checked(engine, dtype):
    """An inference engine runs the exported model and its output is checked against eager (in the row's dtype)
    before timing; one that computes something else is refused."""
    from resnet_fused.bench import anchors

    if engine not in anchors.available():
        pytest.skip(f"{engine} is not installed (the `anchors` extra)")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 9, 9)
    try:
        run = anchors.runner(engine, model, x, dtype)
    except RuntimeError as e:
        if "no bf16 inference on this CPU" not in str(e):
            raise
        pytest.skip(str(e))
    anchors.check_output(engine, torch.as_tensor(run()), model, x, dtype)  # a second run, within the same bound
    with pytest.raises(RuntimeError, match="output differs"):
        anchors.check_output(engine, torch.as_tensor(run()) + (1e-2 if dtype == torch.float32 else 0.3), model, x, dtype)


def test_bf16_models_rows_take_openvino_alone():
    """The models suite's bf16 inference rows keep OpenVINO (bf16 precision) and leave ONNX Runtime out; fp32 rows
    keep both; an anchor asked for a dtype it has not is an error."""
    from resnet_fused.bench import anchors, models

    names = ["eager", "ort", "openvino", "fused-cpu"]
    assert models._providers_in(torch.bfloat16, names) == ["eager", "openvino", "fused-cpu"]
    assert models._providers_in(torch.float32, names) == names
    with pytest.raises(ValueError, match="no anchor 'ort' in torch.bfloat16"):
        anchors.runner("ort", torch.nn.Identity(), torch.randn(1, 3, 4, 4), torch.bfloat16)


def _ms(**kw):
    return dict(median_ms=1.0, p20_ms=1.0, p80_ms=1.0, runs=1, **kw)


def test_a_failing_provider_is_an_error_row_and_the_others_go_on(tmp_path, capsys):
    """A step that raises takes its provider out of the case with the exception as its row's "error";
    the other providers are measured and recorded; an exception leaving the case fails the providers
    still without a result, and the next case runs. Rows reach the file when their case ends."""
    path = tmp_path / "rows.jsonl"
    known = {bench_rows.row_key(dict(suite="s", case="c", shape="1", dtype="d", mode="m", provider="compile-default")):
             dict(suite="s", case="c", shape="1", dtype="d", mode="m", provider="compile-default", median_ms=0.5,
                  speedup_vs_eager=4.0, **{"from": "old/results.json"})}
    rec = bench_rows.Recorder(str(path), {"device": "x"}, known=known)
    fields = dict(suite="s", case="c", shape="1", dtype="d", mode="m")
    built = []

    def build(p):
        if p == "fused-a":
            raise RuntimeError("boom")
        built.append(p)
        return p

    with rec.case(fields, ["eager", "compile-default", "fused-a", "fused-b"]) as c:
        made = c.each(build)
        assert c.live == ["eager", "fused-b"] and set(made) == {"eager", "fused-b"}
        c.result("eager", **_ms())
        c.result("fused-b", median_ms=0.25, p20_ms=0.2, p80_ms=0.3, runs=3)
        assert len(path.read_text().splitlines()) == 1  # only the header until the case ends
    assert built == ["eager", "fused-b"]  # the reused provider is not built
    eager, compiled, failed, b = rec.rows
    assert compiled == known[bench_rows.row_key(compiled)]
    assert failed == {**fields, "provider": "fused-a", "error": "RuntimeError: boom"}
    assert eager["speedup_vs_eager"] == 1.0 and b["speedup_vs_eager"] == 4.0
    with rec.case({**fields, "case": "d"}, ["eager", "fused-b"]) as c:
        c.result("fused-b", **_ms())
        raise ValueError("late")
    assert [(r["provider"], r.get("error")) for r in rec.rows[4:]] == [("eager", "ValueError: late"), ("fused-b", None)]
    assert rec.rows[5]["speedup_vs_eager"] is None  # no eager to compare with
    rec.close("complete")
    assert bench_rows.read(str(path)) == ({"device": "x"}, rec.rows, "complete")
    table = bench.format_table(rec.rows)
    assert "failed: RuntimeError: boom" in table and "failed: ValueError: late" in table and " *" in table
    assert "bench: fused-a failed" in capsys.readouterr().err  # with its traceback, for the log


def test_a_provider_that_raises_in_a_suite(tmp_path, monkeypatch):
    """In a real suite: the failing provider's row names the exception; eager and the others are timed."""
    from resnet_fused.bench import convs

    real = convs._forward

    def forward(shape, provider, *args):
        if provider == "fused-cpu":
            raise RuntimeError("no kernel for this")
        return real(shape, provider, *args)

    monkeypatch.setattr(convs, "_forward", forward)
    rec = bench_rows.Recorder(str(tmp_path / "rows.jsonl"), {})
    convs.run([ConvShape("tiny", 4, 6, 8, 3)], 1, [torch.float32], ["inference"], torch.device("cpu"), [], True, rec)
    by = {r["provider"]: r for r in rec.rows}
    assert set(by) == {"conv only", "eager", "fused-cpu", "tuned"}
    assert by["fused-cpu"]["error"] == "RuntimeError: no kernel for this" and "median_ms" not in by["fused-cpu"]
    assert all(by[p]["median_ms"] > 0 and by[p]["speedup_vs_eager"] > 0 for p in ("conv only", "eager", "tuned"))


def test_the_deadline_stops_the_run_cleanly(tmp_path, monkeypatch, capsys):
    """A fake clock one second further at every look: with --deadline 2.5 two cases start (at 1 and 2 s),
    the third does not; the run writes those rows as results and returns."""
    ticks = iter(range(1000))
    monkeypatch.setattr(bench_rows, "clock", lambda: next(ticks))
    bench.main(["--suite", "ops", "--quick", "--batch", "1", "--device", "cpu", "--no-compile", "--deadline", "2.5",
                "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["stopped"] == "deadline"
    assert [(r["op"], r["provider"]) for r in data["results"]] == [
        ("bn_act eval", "eager"), ("bn_act eval", "cpu"), ("bn_act train", "eager"), ("bn_act train", "cpu")]
    assert bench_rows.read(str(tmp_path / "rows.jsonl"))[1:] == (data["results"], "deadline")
    assert (tmp_path / "results.csv").exists() and (tmp_path / "ops.png").exists()
    assert "stopped at the deadline (2.5 s): 4 of 16 rows" in capsys.readouterr().out


def test_a_killed_run_leaves_its_rows(tmp_path):
    """SIGKILL after the first case's rows reach rows.jsonl: the file is valid JSON lines without an end
    line, and --from-rows turns it into results marked "killed"."""
    rows_path = tmp_path / "rows.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "resnet_fused.bench", "--suite", "ops", "--quick", "--batch", "1",
                             "--device", "cpu", "--no-compile", "--out", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (rows_path.exists() and '"suite"' in rows_path.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "no row within 60 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    lines = rows_path.read_text().splitlines()
    objs = [json.loads(line) for line in lines]  # every line whole
    assert "environment" in objs[0] and 2 <= len(objs) < 17 and all("suite" in o for o in objs[1:])
    env, rows, end = bench_rows.read(str(rows_path))
    assert end is None and rows == objs[1:]
    assert not (tmp_path / "results.json").exists()
    bench.main(["--from-rows", str(rows_path), "--out", str(tmp_path / "table")])
    data = json.loads((tmp_path / "table" / "results.json").read_text())
    assert data == {"environment": env, "results": rows, "stopped": "killed"}


def test_rows_file_reader_drops_a_line_cut_short(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"environment": {"device": "x"}}\n{"suite": "ops", "provider": "eager"}\n{"suite": "ops", "prov')
    assert bench_rows.read(str(path)) == ({"device": "x"}, [{"suite": "ops", "provider": "eager"}], None)


def test_known_compile_rows_come_from_the_same_device_and_versions(tmp_path):
    """Only compile-<mode> rows of the eager module, measured on the same device with the same torch and
    triton, not failed, not at eager's time (a compile that ran eager); each keeps the file it came from."""
    env = dict(device="GPU X", torch="2.11", triton="3.6")
    row = dict(suite="blocks", case="b", shape="1", dtype="bfloat16", mode="training", median_ms=1.0)
    rows = [dict(row, provider=p, median_ms=ms) for p, ms in (("eager", 2.0), ("compile-default", 1.0),
                                                             ("compile-fused", 1.0), ("tuned", 1.0))]
    rows.append(dict(row, provider="compile-max-autotune", error="RuntimeError: x"))
    rows += [dict(row, case="at eager", provider=p, median_ms=ms) for p, ms in (("eager", 1.0), ("compile-default", 1.01))]
    for name, e in (("same", env), ("torch", {**env, "torch": "2.14"}), ("device", {**env, "device": "GPU Y"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"environment": e, "results": rows}))
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "rows.jsonl").write_text(
        json.dumps({"environment": env}) + "\n" + json.dumps(dict(row, provider="compile-max-autotune", mode="inference")) + "\n")
    known = bench_rows.measured_compile(str(tmp_path), env)
    assert sorted((k[1], k[4], k[5]) for k in known) == [("b", "inference", "compile-max-autotune"),
                                                        ("b", "training", "compile-default")]
    assert {v["from"] for v in known.values()} == {str(tmp_path / "same" / "results.json"),
                                                  str(tmp_path / "killed" / "rows.jsonl")}
    assert bench_rows.measured_compile(str(tmp_path), {**env, "triton": "3.8"}) == {}
