#!/usr/bin/env bash
# One command for a GPU machine: build, test, sanitize, benchmark; everything lands in OUTDIR.
#
#   benchmarks/gpu_check.sh [all|build|test|sanitize|bench|quick|verify] OUTDIR [pytest arguments]
#
# Each stage also runs alone, so the whole check fits in a few commands of at most 10 minutes each
# (all = build test sanitize bench; quick = build, the tests, then a --quick benchmark). `test` takes
# pytest arguments after OUTDIR to run one part (e.g. tests/test_cuda.py). `verify` (no GPU needed)
# only checks that OUTDIR fits what a remote machine sends back; every other stage ends with it.
# OUTDIR receives at most 8 files, each under 16 MB (a remote machine sends back no more):
#   summary.txt  build.log  test.log  junit.xml  sanitize.log  bench.log  results.csv  results.json
# Environment: PYTHON (default python3), TEST_TIMEOUT / BENCH_TIMEOUT (seconds per stage),
# PYTEST_WORKERS (default 8; the GPU is shared between them), BENCH_ARGS (extra bench arguments).
set -uo pipefail

MAX_FILES=8 MAX_BYTES=$((15 * 1024 * 1024))
usage() { echo "usage: $0 [all|build|test|sanitize|bench|quick|verify] OUTDIR [pytest arguments]" >&2; exit 2; }
[[ $# -eq 1 ]] && set -- all "$1"
[[ $# -ge 2 ]] || usage
stage=$1 out=$2
shift 2
case $stage in all|build|test|sanitize|bench|quick|verify) ;; *) usage ;; esac
[[ $# -eq 0 || $stage == test ]] || usage

# OUTDIR must come back whole: at most MAX_FILES plain files, no folders, none over MAX_BYTES
# (a log over the limit keeps its last MAX_BYTES).
verify_out() {
    local f n=0 rc=0
    for f in "$1"/* "$1"/.[!.]*; do
        [[ -e $f ]] || continue
        if [[ ! -f $f || -L $f ]]; then echo "gpu_check: $f is not a plain file; it would not come back" >&2; rc=1; continue; fi
        n=$((n + 1))
        if (( $(stat -c %s "$f") > MAX_BYTES )); then
            tail -c "$MAX_BYTES" "$f" >"$f.tail" && mv "$f.tail" "$f"
            echo "gpu_check: $f truncated to its last $MAX_BYTES bytes" >&2
        fi
    done
    if (( n > MAX_FILES )); then echo "gpu_check: $1 holds $n files, more than the $MAX_FILES that come back" >&2; rc=1; fi
    return $rc
}
if [[ $stage == verify ]]; then
    [[ -d $out ]] || { echo "gpu_check: $out is not a directory" >&2; exit 2; }
    verify_out "$out"; exit $?
fi

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi finds none); nothing to check" >&2
    exit 3
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
summary="$out/summary.txt"
note() { echo "$*" | tee -a "$summary"; }

run_build() {
    note "== build $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader | tee -a "$summary"
    $PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "triton", triton.__version__)' | tee -a "$summary"
    nvcc --version | tail -1 | tee -a "$summary"
    # the visible GPU's architecture only; all cores
    local arch
    arch=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
    local t0=$SECONDS
    TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) $PY -m pip install --no-build-isolation --no-deps -v -e . >"$out/build.log" 2>&1
    local rc=$?
    note "build (arch $arch): rc=$rc in $((SECONDS - t0)) s"
    grep -E "ptxas info|spill|error" "$out/build.log" | sort | uniq -c | sort -rn | head -20 | tee -a "$summary"
    $PY -c 'from resnet_fused import backends; print("backends:", backends.available(), "extension has CUDA:", backends.extension_has_cuda())' 2>&1 | tee -a "$summary"
    return $rc
}

run_tests() {
    note "== test $(date -u +%FT%TZ)"
    local t0=$SECONDS
    # one line per test (-v), so a run cut short still says what passed; at the time limit pytest gets
    # SIGINT first, which still prints the failure summary and writes junit.xml
    timeout -s INT -k 60 "${TEST_TIMEOUT:-330}" $PY -m pytest -v -rfE -n "${PYTEST_WORKERS:-8}" --timeout=240 \
        -p no:cacheprovider -p no:benchmark --durations=15 --junitxml="$out/junit.xml" "$@" >"$out/test.log" 2>&1
    local rc=$?
    note "tests ($*): rc=$rc in $((SECONDS - t0)) s"
    grep -E "^(FAILED|ERROR)|^=+ .*(passed|failed|error)|Timeout|Fatal Python error|node down" "$out/test.log" | tail -60 | tee -a "$summary"
    return $rc
}

run_sanitize() {
    note "== sanitize $(date -u +%FT%TZ)"
    local rc=0 tool
    : >"$out/sanitize.log"
    for tool in memcheck racecheck; do
        timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
            $PY -m pytest -q -p no:cacheprovider -k "small or opcheck" tests/test_cuda.py >>"$out/sanitize.log" 2>&1
        local r=$?; rc=$((rc | r))
        note "sanitize $tool: rc=$r"
    done
    grep -E "ERROR SUMMARY|Invalid|Race" "$out/sanitize.log" | sort | uniq -c | head -20 | tee -a "$summary"
    return $rc
}

run_bench() {
    note "== bench $(date -u +%FT%TZ) $*"
    local t0=$SECONDS dir
    dir=$(mktemp -d)
    timeout "${BENCH_TIMEOUT:-400}" $PY -m resnet_fused.bench --out "$dir" "$@" ${BENCH_ARGS:-} >"$out/bench.log" 2>&1
    local rc=$?
    note "bench: rc=$rc in $((SECONDS - t0)) s"
    cp "$dir"/results.csv "$dir"/results.json "$out"/ 2>/dev/null
    grep -vE "it/s\]|s/it\]" "$out/bench.log" | tail -80 | tee -a "$summary" >/dev/null
    return $rc
}

rc=0
case $stage in
    build) run_build || rc=1 ;;
    test) run_tests "$@" || rc=1 ;;
    sanitize) run_sanitize || rc=1 ;;
    bench) run_bench --compile default --compile max-autotune || rc=1 ;;
    quick) { run_build && run_tests; } || rc=1; run_bench --quick --compile default || rc=1 ;;
    all) { run_build && run_tests; } || rc=1; run_sanitize || rc=1; run_bench --compile default --compile max-autotune || rc=1 ;;
esac
verify_out "$out" || rc=1
note "gpu_check $stage: rc=$rc"
[[ $stage == build ]] || grep -vE "it/s\]|s/it\]" "$out/bench.log" 2>/dev/null | tail -60
exit $rc
