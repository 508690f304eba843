"""benchmarks/gpu_check.sh: the parts that need no GPU (arguments, the no-GPU message, the output limits)."""

import pathlib
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


@pytest.mark.parametrize("args", [(), ("bogus", "out"), ("build", "out", "extra"), ("bench", "out", "-k", "x")])
def test_bad_arguments_print_usage(args):
    r = _run(*args)
    assert r.returncode == 2 and "usage:" in r.stderr, (r.returncode, r.stderr)


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: the no-GPU message does not apply")
@pytest.mark.parametrize("stage", ["all", "build", "test", "sanitize", "bench", "quick"])
def test_without_gpu_says_so_in_one_line(stage, tmp_path):
    r = _run(stage, tmp_path / "out")
    assert r.returncode == 3, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no NVIDIA GPU" in lines[0], r.stderr
    assert not (tmp_path / "out").exists(), "nothing should be written without a GPU"


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
