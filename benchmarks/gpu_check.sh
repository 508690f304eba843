#!/usr/bin/env bash
# One command for a GPU machine: build, test, sanitize, benchmark; everything lands in OUTDIR.
#
#   benchmarks/gpu_check.sh STAGE OUTDIR [pytest arguments]
#
# STAGE: check | test-gpu | build | test | sanitize | bench | bench-kernels | bench-blocks | bench-models
#        | bench-graphs | bench-overhead | cudnn-graphs | quick | all | verify
#   check           build, then in what is left of CHECK_BUDGET (540 s) the benchmark that decisions need:
#                   ops, ResNet-50 stem + layer1 convs (eval and training), both layer1 blocks, bf16 and fp16,
#                   eager / fused-cuda / fused-triton / tuned, torch.compile only for cases that
#                   benchmarks/results holds no number of from this GPU, torch and triton; Triton autotuning
#                   over the 3 configs that fit each shape best
#   test-gpu        build, then tests/gpu without the over-2^31-element cases (TEST_TIMEOUT 300 s)
#   test            the tests (all, or the files / -k given after OUTDIR), 8 xdist workers
#   sanitize        compute-sanitizer memcheck and racecheck over the small GPU tests
#   bench-kernels   ops + convs suites, bf16, batch 256 (the bandwidth and conv-epilogue targets)
#   bench-blocks    blocks suite, bf16, batch 256, with torch.compile
#   bench-models    resnet18/50, bf16, batch 1 and 256, torch.compile default and max-autotune
#   bench-graphs    the models at batch 1 as CUDA-graph replays
#   bench-overhead  host time per block call at tiny sizes, aten ops and launches per step, bf16, eager and fused
#                   (torch.compile left out: minutes of compiling for a host-path number)
#   bench           the four parts above, then the targets table (benchmarks/targets.py)
#   cudnn-graphs    build, then which cuDNN fused graphs (conv + genstats, BN-ReLU prologue + conv + genstats; the
#                   tests also build the backward's dgrad + dReLU + dBN-weight and BN-ReLU + wgrad) build
#                   at the ResNet-18/50 shapes, fp16 and bf16, with cuDNN's reason where not, and each one's time
#                   beside today's path (benchmarks/cudnn_graphs_probe.py), then tests/gpu/test_cudnn_graphs.py (the
#                   graph kernels of csrc/cudnn/; CUDNN_PROBE=0: the tests only; PROBE_ARGS: the probe's own, e.g.
#                   "--patterns conv+reduce,bnrelu+conv+reduce --dtypes bf16"). Every build installs cudnn-frontend from wheels/
#                   (benchmarks/fetch_gpu_wheels.sh, carried with the tree) when it is missing
#   quick           build, test, then a --quick benchmark;  all: build test sanitize bench
#   verify          (no GPU needed) checks that OUTDIR fits what a remote machine sends back
# Each stage fits in a command of at most 10 minutes (all and bench do not: run their parts). A bench part
# writes each row to OUTDIR/rows.jsonl as it is measured and starts no case in its last BENCH_MARGIN
# seconds (--deadline); results-<part>.json comes from the bench, or from rows.jsonl if it was killed.
# OUTDIR receives at most 8 files, each under 16 MB: summary.txt (the short story), gpu_check.log (every
# log, appended), junit.xml, results-<part>.json, rows.jsonl (the last part's rows).
# Environment: PYTHON (default python3), TEST_TIMEOUT / BENCH_TIMEOUT (seconds per stage or part),
# CHECK_BUDGET (seconds for the check stage, build included), BENCH_MARGIN (default 60), PYTEST_WORKERS
# (default 8), BENCH_ARGS (extra bench arguments), PREBUILT=0 (build here even where prebuilt/ fits).
# prebuilt/ (benchmarks/prebuild_gpu.sh, run on a CPU machine beforehand and carried) replaces the build where its
# MANIFEST matches this machine's torch, Python, GPU architecture and this tree's sources.
set -uo pipefail

MAX_FILES=8 MAX_BYTES=$((15 * 1024 * 1024))
STAGES="all|check|test-gpu|build|test|sanitize|bench|bench-kernels|bench-blocks|bench-models|bench-graphs|bench-overhead|cudnn-graphs|quick|verify"
usage() { echo "usage: $0 [$STAGES] OUTDIR [pytest arguments]" >&2; exit 2; }
[[ $# -eq 1 ]] && set -- all "$1"
[[ $# -ge 2 ]] || usage
stage=$1 out=$2
shift 2
[[ "|$STAGES|" == *"|$stage|"* ]] || usage
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
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this tree's package, installed (-e) or with prebuilt/'s modules
summary="$out/summary.txt" log="$out/gpu_check.log"
note() { echo "$*" | tee -a "$summary"; }
section() { note "== $* $(date -u +%FT%TZ)"; echo "==== $* $(date -u +%FT%TZ)" >>"$log"; }

# cudnn-frontend (the `gpu` extra: the C++ headers csrc/cudnn/ compiles with, and the probe's Python module), from
# wheels/ (benchmarks/fetch_gpu_wheels.sh, carried with the tree) when it is missing: before the build, which then
# compiles the cuDNN graphs in
install_frontend() {
    $PY -c 'import importlib.metadata as m; m.version("nvidia-cudnn-frontend")' >/dev/null 2>&1 && return 0
    if compgen -G "wheels/nvidia_cudnn_frontend-*.whl" >/dev/null; then
        $PY -m pip install --no-deps wheels/nvidia_cudnn_frontend-*.whl >>"$log" 2>&1
        note "cudnn-frontend installed from wheels/: rc=$?"
    else
        note "cudnn-frontend missing and no wheels/ (run benchmarks/fetch_gpu_wheels.sh where there is an index): no cuDNN graphs"
    fi
}

# prebuilt/ (benchmarks/prebuild_gpu.sh, carried with the tree) fits this machine and tree (benchmarks/prebuilt.py);
# says why not where it does not (PREBUILT=0: never used)
prebuilt_fits() {  # arch
    [[ ${PREBUILT:-1} != 0 && -d prebuilt ]] || return 1
    local why
    why=$($PY benchmarks/prebuilt.py check prebuilt --arch "$1") && return 0
    note "prebuilt/ not used: $why"
    return 1
}

run_build() {
    section build
    install_frontend
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader | tee -a "$summary"
    $PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "triton", triton.__version__)' | tee -a "$summary"
    nvcc --version | tail -1 | tee -a "$summary"
    # the compiler the build takes (torch's cpp_extension: $CXX, else c++), the kernel (gVisor says 4.4.0), glibc
    { echo "CXX=${CXX:-(unset: c++)}"; ${CXX:-c++} --version | head -1; echo "kernel $(uname -r), $(ldd --version | head -1)"
      env | grep -E "^(TORCH|CUDA|NCCL|OMP)_" ; } 2>&1 | tee -a "$summary"
    local arch t0=$SECONDS rc
    arch=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
    if prebuilt_fits "$arch"; then
        cp prebuilt/*.so resnet_fused/  # the package is then imported from this tree (PYTHONPATH above), not installed
        rc=0
        note "build: prebuilt/ used (benchmarks/prebuild_gpu.sh): $(grep -E '^(commit|compiler|built)=' prebuilt/MANIFEST | tr '\n' ' ')"
    else
        # the visible GPU's architecture only; all cores
        TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) $PY -m pip install --no-build-isolation --no-deps -v -e . >>"$log" 2>&1
        rc=$?
        note "build (arch $arch): rc=$rc in $((SECONDS - t0)) s"
    fi
    $PY -c 'from resnet_fused import backends; from resnet_fused.ops import cudnn; print("backends:", backends.available(), "extension has CUDA:", backends.extension_has_cuda(), "cuDNN graphs:", cudnn.graphs_built())' 2>&1 | tee -a "$summary"
    return $rc
}

run_tests() {
    section "test $*"
    # first, alone: the C++ ops' error path in a fresh process (a native backtrace if it crashes, as the
    # first H200 run's xdist workers did)
    $PY -m pytest -q -p no:cacheprovider tests/test_bad_input.py -k fresh_process >>"$log" 2>&1
    note "bad-input errors in a fresh process: rc=$?"
    local t0=$SECONDS tlog
    tlog=$(mktemp)
    # one line per test (-v), so a run cut short still says what passed; at the time limit pytest gets
    # SIGINT first, which still prints the failure summary and writes junit.xml
    # the Triton conv autotunes over one config (numerics, not speed; a compile per config on a cold
    # cache); RESNET_FUSED_TRITON_AUTOTUNE=1 in the environment keeps full tuning
    RESNET_FUSED_TRITON_AUTOTUNE=${RESNET_FUSED_TRITON_AUTOTUNE:-0} \
    timeout -s INT -k 60 "${TEST_TIMEOUT:-480}" $PY -m pytest -v -rfE -n "${PYTEST_WORKERS:-8}" --timeout=240 \
        -p no:cacheprovider -p no:benchmark --durations=15 --junitxml="$out/junit.xml" "$@" >"$tlog" 2>&1
    local rc=$?
    cat "$tlog" >>"$log"
    note "tests ($*): rc=$rc in $((SECONDS - t0)) s"
    grep -E "^(FAILED|ERROR)|^=+ .*(passed|failed|error)|Timeout|Fatal Python error|node down" "$tlog" | tail -80 | tee -a "$summary"
    rm -f "$tlog"
    return $rc
}

run_sanitize() {
    section sanitize
    local rc=0 tool r
    for tool in memcheck racecheck; do
        timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
            $PY -m pytest -q -p no:cacheprovider tests/gpu/test_cuda.py tests/gpu/test_gpu_ops.py -k "small or opcheck" >>"$log" 2>&1
        r=$?; rc=$((rc | r))
        note "sanitize $tool: rc=$r"
    done
    grep -E "ERROR SUMMARY" "$log" | tail -4 | tee -a "$summary"
    return $rc
}

bench_args() {
    case $1 in
        kernels) echo "--suite ops --suite convs --dtype bf16 --batch 256" ;;
        blocks) echo "--suite blocks --dtype bf16 --batch 256 --compile default" ;;
        models) echo "--suite models --dtype bf16 --batch 1 --batch 256 --compile default --compile max-autotune" ;;
        graphs) echo "--suite models --dtype bf16 --batch 1 --cuda-graphs" ;;
        overhead) echo "--suite overhead --dtype bf16 --no-compile" ;;
        quick) echo "--quick --compile default" ;;
        check) echo "--suite ops --suite blocks --suite convs --quick --conv-mode inference --conv-mode training --compile default --known-compile benchmarks/results" ;;
    esac
}

run_bench() {  # one part [seconds]
    local part=$1 limit=${2:-${BENCH_TIMEOUT:-540}} margin=${BENCH_MARGIN:-60} t0=$SECONDS dir deadline
    deadline=$(( limit > 2 * margin ? limit - margin : limit / 2 ))
    section "bench $part: $(bench_args "$part") ${BENCH_ARGS:-} (deadline ${deadline} s, killed at ${limit} s)"
    dir=$(mktemp -d)
    rm -f "$out/rows.jsonl" "$out/results-$part.json"  # the previous part's rows are in its results-<part>.json
    # shellcheck disable=SC2046
    timeout -k 10 "$limit" $PY -m resnet_fused.bench --out "$dir" --rows "$out/rows.jsonl" --deadline "$deadline" \
        $(bench_args "$part") ${BENCH_ARGS:-} 2>&1 | grep -vE "it/s\]|s/it\]" >>"$log"
    local rc=${PIPESTATUS[0]}
    if [[ ! -f $dir/results.json && -f $out/rows.jsonl ]]; then  # killed: the rows it had flushed
        $PY -m resnet_fused.bench --from-rows "$out/rows.jsonl" --out "$dir" >>"$log" 2>&1
    fi
    cp "$dir/results.json" "$out/results-$part.json" 2>/dev/null
    rm -rf "$dir"
    note "bench $part: rc=$rc in $((SECONDS - t0)) s; $($PY -c 'import json, sys
d = json.load(open(sys.argv[1])); rows = d["results"]
print(len(rows), "rows,", sum("error" in r for r in rows), "failed,", d.get("stopped", "complete"))' \
        "$out/results-$part.json" 2>/dev/null || echo "no rows")"
    return $rc
}

run_check() {  # build, then the check part in what is left of CHECK_BUDGET
    local t0=$SECONDS rc=0
    run_build || rc=1  # without the extension the bench still measures eager, Triton and compile
    export RESNET_FUSED_TRITON_MAX_CONFIGS=${RESNET_FUSED_TRITON_MAX_CONFIGS:-3}
    local left=$(( ${CHECK_BUDGET:-540} - (SECONDS - t0) ))
    run_bench check $(( left > 60 ? left : 60 )) || rc=1
    return $rc
}

run_cudnn_graphs() {  # [seconds]
    local limit=${1:-${BENCH_TIMEOUT:-540}} t0=$SECONDS rc
    section cudnn-graphs
    install_frontend
    rc=0
    if [[ ${CUDNN_PROBE:-1} != 0 ]]; then  # CUDNN_PROBE=0: the graph tests only (the probe's table is in results/)
        timeout -k 10 "$limit" $PY benchmarks/cudnn_graphs_probe.py --time --deadline $(( limit > 120 ? limit - 60 : limit / 2 )) \
            ${PROBE_ARGS:-} 2>&1 | tee -a "$log" | tee -a "$summary" >/dev/null
        rc=${PIPESTATUS[0]}
        note "cudnn-graphs probe: rc=$rc in $((SECONDS - t0)) s"
    fi
    # the graph kernels themselves (csrc/cudnn/): numerics against float64, the route, fallbacks, capture; and the
    # stem padded to 8 channels (the tuner's cuda-padded candidate), whose graphs the probe lists as "stem, padded"
    # (-rP: the passing tests' prints too, the backward graphs' "built" / "declined: reason" lines into the summary)
    TEST_TIMEOUT=${GRAPH_TEST_TIMEOUT:-180} PYTEST_WORKERS=1 run_tests -rP tests/gpu/test_cudnn_graphs.py \
        tests/gpu/test_gpu_cudnn.py::test_padded_stem_on_the_cuda_backend || rc=1
    grep -E "\| (built|declined)" "$log" | sort -u | tail -80 | tee -a "$summary" >/dev/null
    return $rc
}

run_targets() {
    section targets
    $PY benchmarks/targets.py --kernels "$out/results-kernels.json" --models "$out/results-models.json" \
        --graphs "$out/results-graphs.json" 2>&1 | tee -a "$summary"
}

rc=0
case $stage in
    check) run_check || rc=1 ;;
    test-gpu) { run_build && TEST_TIMEOUT=${TEST_TIMEOUT:-300} run_tests tests/gpu --ignore=tests/gpu/test_gpu_xl_tensors.py; } || rc=1 ;;
    build) run_build || rc=1 ;;
    test) run_tests "$@" || rc=1 ;;
    sanitize) run_sanitize || rc=1 ;;
    bench-*) run_bench "${stage#bench-}" || rc=1 ;;
    cudnn-graphs) { run_build && run_cudnn_graphs; } || rc=1 ;;
    bench) for part in kernels blocks models graphs; do run_bench $part || rc=1; done; run_targets ;;
    quick) { run_build && run_tests; } || rc=1; run_bench quick || rc=1 ;;
    all) { run_build && run_tests; } || rc=1; run_sanitize || rc=1
         for part in kernels blocks models graphs; do run_bench $part || rc=1; done; run_targets ;;
esac
verify_out "$out" || rc=1
note "gpu_check $stage: rc=$rc"
exit $rc
