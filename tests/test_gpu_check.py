"""benchmarks/gpu_check.sh: the parts that need no GPU (arguments, the no-GPU message, the output limits)."""

import json
import pathlib
import re
import shutil
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
MAX_BYTES = 15 * 1024 * 1024


def _run(*args):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


@pytest.mark.parametrize("args", [(), ("bogus", "out"), ("bench-", "out"), ("build", "out", "extra"), ("bench", "out", "-k", "x")])
def test_bad_arguments_print_usage(args):
    r = _run(*args)
    assert r.returncode == 2 and "usage:" in r.stderr, (r.returncode, r.stderr)


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: the no-GPU message does not apply")
@pytest.mark.parametrize("stage", ["all", "check", "test-gpu", "build", "test", "sanitize", "bench", "bench-kernels",
                                   "bench-blocks", "bench-models", "bench-graphs", "cudnn-graphs", "quick"])
def test_without_gpu_says_so_in_one_line(stage, tmp_path):
    r = _run(stage, tmp_path / "out")
    assert r.returncode == 3, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no NVIDIA GPU" in lines[0], r.stderr
    assert not (tmp_path / "out").exists(), "nothing should be written without a GPU"


def _bench_parts() -> dict[str, str]:
    """bench_args' parts and their arguments, as the script spells them."""
    body = SCRIPT.read_text().split("bench_args() {", 1)[1].split("\n}", 1)[0]
    return dict(re.findall(r'^\s+([\w-]+)\) echo "([^"]*)" ;;$', body, re.M))


def test_every_bench_part_parses_as_bench_arguments():
    """Each part's arguments are valid for the bench's command line (--rows and --deadline as run_bench
    adds them); check reuses the committed compile numbers and measures eval and training convs."""
    from resnet_fused.bench import __main__ as bench

    parts = _bench_parts()
    assert {"kernels", "blocks", "models", "graphs", "quick", "check"} <= set(parts)
    for part, argv in parts.items():
        args = bench.parse_args(["--out", "o", "--rows", "o/rows.jsonl", "--deadline", "480", *argv.split()])
        assert args.deadline == 480.0, part
    check = bench.parse_args(parts["check"].split())
    assert check.suite == ["ops", "blocks", "convs"] and check.conv_mode == ["inference", "training"]
    assert check.known_compile == "benchmarks/results" and (SCRIPT.parent / "results").is_dir()


def test_stages_are_listed_in_usage():
    r = _run("bogus", "out")
    for stage in ("check", "test-gpu"):
        assert f"|{stage}|" in r.stderr, r.stderr


def test_verify_accepts_what_comes_back(tmp_path):
    for i in range(8):
        (tmp_path / f"f{i}.log").write_text(f"log {i}\n")
    r = _run("verify", tmp_path)
    assert r.returncode == 0, r.stderr


def test_verify_rejects_too_many_files_and_folders(tmp_path):
    for i in range(9):
        (tmp_path / f"f{i}.log").write_text("x")
    r = _run("verify", tmp_path)
    assert r.returncode == 1 and "9 files, more than the 8" in r.stderr, r.stderr
    for f in tmp_path.iterdir():
        f.unlink()
    (tmp_path / "nested").mkdir()
    r = _run("verify", tmp_path)
    assert r.returncode == 1 and "not a plain file" in r.stderr, r.stderr


def test_verify_keeps_the_tail_of_an_oversized_log(tmp_path):
    log = tmp_path / "test.log"
    head, tail = b"a" * (2 * 1024 * 1024), b"b" * MAX_BYTES  # the last MAX_BYTES are all b
    log.write_bytes(head + tail)
    r = _run("verify", tmp_path)
    assert r.returncode == 0 and "truncated" in r.stderr, r.stderr
    data = log.read_bytes()
    assert len(data) == MAX_BYTES and data == tail


def _row(suite, provider, ms, **kw):
    return dict(suite=suite, provider=provider, median_ms=ms, dtype="bfloat16", **kw)


def test_targets_table_reads_every_target_from_the_files(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(SCRIPT.parent))
    import targets

    conv = dict(case="layer1.0.conv1", shape="256x64x56x56>64 k1s1", mode="inference")
    kernels = [_row("ops", "cuda", 1.0, op="add_relu", shape="s", layout="NHWC", pct_of_copy=95.0),
               _row("ops", "triton", 1.0, op="bn_act eval", shape="s", layout="NHWC", pct_of_copy=80.0),
               _row("ops", "eager", 1.0, op="add_relu", shape="s", layout="NHWC", pct_of_copy=50.0),
               _row("convs", "conv only", 1.0, **conv), _row("convs", "fused-cuda", 1.2, **conv),
               _row("convs", "tuned", 1.04, **conv), _row("convs", "eager", 2.0, **conv),
               dict(suite="ops", provider="triton", op="add_relu", shape="s", layout="NHWC", dtype="bfloat16",
                    error="RuntimeError: x")]  # a failed provider: no target
    m = dict(case="resnet50", shape="256x3x224x224")
    models = [_row("models", p, ms, mode="inference", **m) for p, ms in
              (("eager", 30.0), ("compile-max-autotune", 21.0), ("fused-cuda", 20.0), ("tuned", 19.0))]
    models += [_row("models", p, ms, mode="training", peak_mem_mb=mem, **m) for p, ms, mem in
               (("eager", 100.0, 1000.0), ("compile-default", 80.0, 900.0), ("fused-triton", 70.0, 700.0))]
    models.append(_row("models", "eager", 4.0, mode="inference", case="resnet50", shape="1x3x224x224"))
    graphs = [_row("models", "fused-cuda", 1.5, mode="inference", case="resnet50", shape="1x3x224x224"),
              _row("models", "eager", 3.0, mode="inference", case="resnet50", shape="1x3x224x224")]
    for name, rows in (("k", kernels), ("m", models), ("g", graphs)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"environment": {}, "results": rows}))
    got = {(t[0].split(":")[0] + ":" + t[0].split(":")[1], t[1]): t[2:] for t in targets.targets(kernels, models, graphs)}
    assert got[("ops add_relu s: % of copy bandwidth", "cuda")] == (95.0, ">= 90", True)
    assert got[("ops bn_act eval s: % of copy bandwidth", "triton")] == (80.0, ">= 90", False)
    assert got[("convs layer1.0.conv1 256x64x56x56>64 k1s1 eval: time / cuDNN conv alone", "tuned")][2] is True
    assert got[("resnet50 inference b256: speedup vs eager", "tuned")] == (30.0 / 19.0, ">= 1.5", True)
    assert got[("resnet50 inference b256: speedup vs compile-max-autotune", "tuned")][2] is True  # 21/19 = 1.105
    assert got[("resnet50 training b256: speedup vs eager", "fused-triton")] == (100.0 / 70.0, ">= 1.3", True)
    assert got[("resnet50 training b256: speedup vs compile-default", "fused-triton")][2] is True  # 80/70 = 1.14
    assert got[("resnet50 training b256: peak memory / eager's", "fused-triton")] == (0.7, "<= 0.8", True)
    assert got[("resnet50 inference b1: CUDA-graph fused vs eager", "fused-cuda")] == (4.0 / 1.5, ">= 2", True)
    targets.main(["--kernels", str(tmp_path / "k.json"), "--models", str(tmp_path / "missing.json")])
    printed = capsys.readouterr().out
    assert "MISSED" in printed and "not measured" in printed and "met" in printed


def _probe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cudnn_graphs_probe", SCRIPT.parent / "cudnn_graphs_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cudnn_graphs_probe_covers_the_resnet_convs():
    """The probe's shapes: every distinct conv of resnet18 and resnet50 at 224x224, read off the models, and the stem
    as the tuner's cuda-padded candidate runs it (8 input channels); no BN + ReLU prologue before either stem."""
    found = _probe().resnet_convs()
    convs = {_probe().conv_label(c): c["models"] for c in found}
    assert convs["3->64 7x7/2 @224x224"] == ["resnet18", "resnet50"]  # the stem
    assert convs["8->64 7x7/2 @224x224"] == ["stem, padded"]
    assert [c["cin"] for c in found if c["image"]] == [3, 8]
    assert convs["64->64 3x3/1 @56x56"] == ["resnet18", "resnet50"]  # BasicBlock layer1, Bottleneck layer1's 3x3
    assert convs["256->64 1x1/1 @56x56"] == ["resnet50"]  # Bottleneck layer1's reduce
    assert convs["1024->2048 1x1/2 @14x14"] == ["resnet50"]  # layer4's projection shortcut
    assert len(convs) == len(set(convs))


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: the no-GPU message does not apply")
def test_cudnn_graphs_probe_without_gpu_says_so(capsys):
    assert _probe().main([]) == 3
    assert "no CUDA GPU" in capsys.readouterr().err


def _prebuilt():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prebuilt", SCRIPT.parent / "prebuilt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: pathlib.Path) -> pathlib.Path:
    (root / "csrc" / "cuda").mkdir(parents=True)
    (root / "csrc" / "ops.cpp").write_text("// schemas\n")
    (root / "csrc" / "cuda" / "k.cu").write_text("// kernel\n")
    (root / "setup.py").write_text("# build\n")
    return root


def test_prebuilt_manifest_fits_only_the_tree_and_machine_it_was_built_for(tmp_path, capsys):
    """prebuilt/MANIFEST (benchmarks/prebuild_gpu.sh) is used by gpu_check.sh only where the torch, Python ABI, CUDA
    architecture and sources match: a changed source, a renamed file or another architecture each refuse it, saying why."""
    prebuilt = _prebuilt()
    root, out = _tree(tmp_path / "tree"), tmp_path / "prebuilt"
    out.mkdir()
    assert prebuilt.main(["check", str(out), "--arch", "9.0", "--root", str(root)]) == 1
    assert "no " in capsys.readouterr().out
    assert prebuilt.main(["write", str(out), "--arch", "9.0", "--root", str(root), "--commit", "abc"]) == 0
    capsys.readouterr()
    assert prebuilt.main(["check", str(out), "--arch", "9.0", "--root", str(root)]) == 0
    assert capsys.readouterr().out.strip() == "fits"

    assert prebuilt.main(["check", str(out), "--arch", "10.0", "--root", str(root)]) == 1
    assert "arch is 10.0 here, 9.0 in prebuilt/MANIFEST" in capsys.readouterr().out
    before = prebuilt.source_hash(root)
    (root / "csrc" / "cuda" / "k.cu").write_text("// kernel, edited\n")
    assert prebuilt.main(["check", str(out), "--arch", "9.0", "--root", str(root)]) == 1
    assert "sources is" in capsys.readouterr().out
    (root / "csrc" / "cuda" / "k.cu").write_text("// kernel\n")
    assert prebuilt.source_hash(root) == before
    (root / "csrc" / "cuda" / "k.cu").rename(root / "csrc" / "cuda" / "k2.cu")  # same bytes, another name
    assert prebuilt.source_hash(root) != before
    manifest = prebuilt.read(out / "MANIFEST")
    assert prebuilt.mismatches(manifest, {**manifest, "torch": "0.0"}) == ["torch is 0.0 here, " + manifest["torch"] +
                                                                           " in prebuilt/MANIFEST"]


def test_gpu_check_calls_prebuilt_as_it_parses():
    """The check gpu_check.sh runs before using prebuilt/ is one prebuilt.py accepts, and prebuild_gpu.sh's write too."""
    text = SCRIPT.read_text()
    assert "benchmarks/prebuilt.py check prebuilt --arch" in text
    assert "benchmarks/prebuilt.py write prebuilt --arch" in (SCRIPT.parent / "prebuild_gpu.sh").read_text()
    assert "prebuilt/" in (SCRIPT.parent.parent / ".gitignore").read_text().split()
