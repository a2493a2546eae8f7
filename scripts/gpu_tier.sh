#!/usr/bin/env bash
# The GPU tier: what a lent GPU (H100 / H200) runs, in prepared calls of under 10 minutes each.
#
#   bash scripts/gpu_tier.sh prepare          # HERE, before the calls: Fashion-MNIST, the commit and Liger-Kernel into .carry/
#   bash scripts/gpu_tier.sh first            # ON THE GPU, call 1 (planned for 8 min on an H100)
#   bash scripts/gpu_tier.sh second           # ON THE GPU, call 2
#   bash scripts/gpu_tier.sh third            # ON THE GPU, a later lease: the engines and the training-step benchmark
#   bash scripts/gpu_tier.sh --dry-run first  # HERE (and in the test suite): every command, file and argument exists
#
# The device call (see README, "The GPU tier"):  command "bash scripts/gpu_tier.sh first", carry [".carry"],
# timeout_s 570. Everything lands in ONE tarball, $OUT/gpu_<call>.tar.gz, re-packed after every step and on
# exit (a call killed at its limit still returns what ran), plus $OUT/summary.txt (the table printed last).
#
# first:  the package is importable at once (PYTHONPATH, nothing installed; maws_kernels._C builds in the
#         background); maws-doctor (versions, device, driver, backends, every kernel once at small shapes:
#         doctor.json); the compiled Triton kernels against their references (forward and every gradient,
#         fp32 and bf16/fp16); the GPU-marked tests of kernels, models and the loop (per-test timeouts, JUnit
#         XML); maws-bench step at B/16 MAE batch 256 (official eager, ours eager, ours compile); the
#         end-to-end GPU loop test on the carried Fashion-MNIST; once _C landed, the csrc tests and the twins
#         against their references.
# second: the compiled and checkpointed step at L/16 WSP; compute-sanitizer memcheck of the Triton kernels
#         (PYTORCH_NO_CUDA_MEMORY_CACHING=1: out-of-bounds accesses inside the caching allocator's pooled
#         blocks would go unseen), each autotuned kernel pinned to the first config its prune allows; once _C
#         landed, memcheck and racecheck of the CUDA C++ twins (racecheck only there: Triton's own barriers
#         can read as false hazards); the slow GPU tests; the kernel tables; the data benchmark.
# third:  ours ZeRO-1/2/3 vs FSDP2 vs DDP on one GPU (world 1: step time and peak memory) at H/14 and 2B/14 MAE;
#         maws-bench train at B/16 (Triton vs torch kernels).
#
# Every step runs under `timeout` and within the call's budget (GPU_TIER_BUDGET_S, default 480 s for first and
# 500 s for second): a step that would start with too little time left is skipped and says so. The machine's
# own torch / Triton are used; pip is never run, so nothing reaches for the network.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
call=${1:-}
case "$call" in first | second | third | prepare) ;; *)
    echo "usage: bash scripts/gpu_tier.sh [--dry-run] first|second|third|prepare" >&2; exit 2 ;;
esac

CARRY=.carry
FMNIST_SRC=/usr/share/datasets/fashion-mnist
FMNIST_FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"

prepare() {  # copy the demo data into the (git-ignored) carried folder; idempotent
    mkdir -p "$CARRY/fashion-mnist"
    for f in $FMNIST_FILES; do
        if [ ! -f "$CARRY/fashion-mnist/$f" ]; then
            [ -f "$FMNIST_SRC/$f" ] || { echo "gpu_tier prepare: $FMNIST_SRC/$f is missing: apt-get install dataset-fashion-mnist" >&2; return 1; }
            cp "$FMNIST_SRC/$f" "$CARRY/fashion-mnist/$f.tmp" && mv "$CARRY/fashion-mnist/$f.tmp" "$CARRY/fashion-mnist/$f"
        fi
    done
    git rev-parse --short HEAD >"$CARRY/commit" 2>/dev/null || rm -f "$CARRY/commit"  # the rows' commit there
    # Liger-Kernel (pure Python) for maws-bench kernels' liger rows: the device reaches no index, so the venv's
    # copy travels in .carry/pylib (on PYTHONPATH there), without its bytecode
    local site; site=$(ls -d .venv/lib/python3*/site-packages 2>/dev/null | head -1)
    if [ -n "$site" ] && [ -d "$site/liger_kernel" ] && [ ! -d "$CARRY/pylib/liger_kernel" ]; then
        mkdir -p "$CARRY/pylib" && rm -rf "$CARRY/pylib.tmp" && mkdir -p "$CARRY/pylib.tmp" \
            && cp -r "$site/liger_kernel" "$site"/liger_kernel-*.dist-info "$CARRY/pylib.tmp/" \
            && find "$CARRY/pylib.tmp" -name __pycache__ -prune -exec rm -rf {} + \
            && mv "$CARRY/pylib.tmp"/* "$CARRY/pylib/" && rmdir "$CARRY/pylib.tmp"
    fi
    echo "gpu_tier prepare: $CARRY/fashion-mnist ready ($(du -sh "$CARRY" | cut -f1)); carry [\"$CARRY\"] in the device call"
}
if [ "$call" = prepare ]; then prepare; exit $?; fi

PY=${PYTHON:-python3}
# the dry run happens on a CPU machine set up by scripts/setup.sh, whose python is the venv's
[ "$dry" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
PY=$(command -v "$PY" || echo "$PY"); case "$PY" in /*) ;; *) PY=$REPO/$PY ;; esac  # absolute: the build cds
OUT=${OUT:-$REPO/gpu_out}
# The logs live OUTSIDE $OUT: a call brings back at most 8 files, so $OUT holds only the tarball and the summary.
LOGS=${GPU_TIER_LOGS:-${TMPDIR:-/tmp}/maws_gpu_tier}/gpu_$call   # packed into $OUT/gpu_$call.tar.gz
EXT=${LOGS%/*}/ext_$call            # the background build: its objects and log, beside $LOGS, never packed live
export PYTHONPATH=$REPO:$REPO/kernels${PYTHONPATH:+:$PYTHONPATH}
[ -d "$REPO/$CARRY/pylib" ] && PYTHONPATH=$PYTHONPATH:$REPO/$CARRY/pylib  # after the machine's own packages
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1
# The commit the rows name: the device gets no .git, so `prepare` writes it into the carried folder.
[ -z "${MAWS_COMMIT:-}" ] && [ -f "$CARRY/commit" ] && MAWS_COMMIT=$(cat "$CARRY/commit") && export MAWS_COMMIT
unset TRITON_INTERPRET              # compiled Triton: the interpreter is for machines without CUDA
budget=${GPU_TIER_BUDGET_S:-$([ "$call" = first ] && echo 480 || echo 500)}
max_step=${GPU_TIER_MAX_STEP_S:-600}  # caps every step's own limit (a quick smoke run)
status=0
summary=()
planned=()                          # dry run: what each step would run

pack() {  # the tarball, atomically: a call killed mid-pack keeps the previous one
    [ "$dry" = 1 ] && return 0
    printf '%s\n' "${summary[@]}" >"$LOGS/summary.txt"
    cp "$LOGS/summary.txt" "$OUT/summary.txt"
    # rc 1 is "a file changed as we read it" (a step's log still being written): the archive is still whole
    tar czf "$OUT/.gpu_$call.tar.gz" --warning=no-file-changed -C "$(dirname "$LOGS")" "gpu_$call" 2>/dev/null
    [ $? -le 1 ] && mv "$OUT/.gpu_$call.tar.gz" "$OUT/gpu_$call.tar.gz"
}

# step NAME SECONDS CMD...: run CMD under `timeout` (capped by what is left of the budget), log it to
# $LOGS/NAME.log, add a summary line, re-pack. A failure is remembered, never fatal.
step() {
    local name=$1 limit=$2; shift 2
    if [ "$dry" = 1 ]; then planned+=("$name|$(printf '%q ' "$@")"); check_cmd "$name" "$@"; return 0; fi
    local left=$((budget - SECONDS))
    if [ "$left" -lt 20 ]; then
        status=1  # nothing measured is not a pass
        summary+=("$(printf '%-22s %-8s %s' "$name" SKIPPED "budget spent ($SECONDS s of $budget)")"); pack; return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    [ "$limit" -gt "$max_step" ] && limit=$max_step
    echo "== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    # through bash -c: a step may be one of the functions below (exported), which `timeout` cannot run itself
    timeout -k 15 "$limit" bash -c '"$@"' "$name" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    local verdict=OK
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict=TIMEOUT
    [ "$rc" -ne 0 ] && [ "$verdict" = OK ] && verdict=FAILED
    [ "$rc" -eq 0 ] || status=1
    local last; last=$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-110)
    summary+=("$(printf '%-22s %-8s rc=%-3s %4s s  %s' "$name" "$verdict" "$rc" "$((SECONDS - t0))" "$last")")
    echo "   ${summary[-1]}"
    pack
}

# --- the dry run: every script, test path and carried file exists, every maws-bench command parses ----------
check_cmd() {
    local name=$1; shift
    local a prev=""
    for a in "$@"; do
        case "$a" in
            benchmarks/*.py | scripts/*.sh | tests/*) [ -e "$a" ] || dry_fail "$name: $a does not exist" ;;
        esac
        if [ "$prev" = -m ]; then  # python -m MODULE: the module is found where the call will look
            "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)" "$a" \
                2>/dev/null || dry_fail "$name: python module $a does not exist"
        fi
        prev=$a
    done
}
dry_problems=()
dry_fail() { dry_problems+=("$1"); }

bench() { "$PY" -c "import sys; from maws_fast.cli.bench import bench_main; sys.exit(bench_main(sys.argv[1:]))" "$@"; }
# the pytest options of every GPU test step: a per-test timeout, a JUnit file, no cache writes
pytest_gpu() {  # pytest_gpu NAME MARK PATHS...
    local name=$1 mark=$2; shift 2
    # Several processes compile Triton kernels in parallel (16 cores there) on the one GPU; test by test
    # (--dist load), since one file (attention's) holds most of the compiles. -v: each verdict is logged as
    # it comes, so a step killed at its limit still shows which tests passed (the JUnit file is written at the end).
    local workers=()
    [ "${GPU_TIER_XDIST:-4}" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null && workers=(-n "${GPU_TIER_XDIST:-4}" --dist load)
    "$PY" -m pytest -v -rfE -m "$mark" -p no:cacheprovider --timeout=120 --junitxml="$LOGS/$name.xml" \
        -o junit_family=xunit2 "${workers[@]}" "$@"
}

export -f bench pytest_gpu
# CI=1: a test whose data is missing fails instead of skipping (tests/conftest.py's needs_fmnist), so an
# empty GPU run never reads as a pass
export PY LOGS CI=1

build_ext_bg() {  # maws_kernels._C built in the background, into $EXT; wait_ext lands it (or not)
    [ "$dry" = 1 ] && { [ -f kernels/setup.py ] || dry_fail "kernels/setup.py is missing"; return 0; }
    rm -rf "$EXT"; mkdir -p "$EXT"
    (cd kernels && TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-12} \
        "$PY" setup.py build_ext --build-temp "$EXT/tmp" --build-lib "$EXT/lib") >"$EXT/build_ext.log" 2>&1 &
    ext_pid=$!
}
# wait_ext: the build's verdict as a step of its own, waiting at most what is left of the budget. Only here
# does the .so land in kernels/maws_kernels, so every step before ran without _C and every step after
# with it (no test's backend depends on when the build happened to end); a failed build lands nothing.
wait_ext() {
    [ "$dry" = 1 ] && return 0
    local t0=$SECONDS rc=124
    while kill -0 "$ext_pid" 2>/dev/null && [ $((budget - SECONDS)) -gt 20 ]; do sleep 2; done
    if kill -0 "$ext_pid" 2>/dev/null; then
        kill "$ext_pid" 2>/dev/null; echo "gpu_tier: build stopped, budget spent" >>"$EXT/build_ext.log"
    else
        wait "$ext_pid"; rc=$?
    fi
    local so; so=$(ls "$EXT"/lib/maws_kernels/_C*.so 2>/dev/null | head -1)
    if [ "$rc" -eq 0 ] && [ -n "$so" ]; then
        cp "$so" "kernels/maws_kernels/.$(basename "$so").tmp" && mv "kernels/maws_kernels/.$(basename "$so").tmp" \
            "kernels/maws_kernels/$(basename "$so")" \
            && "$PY" -c "from maws_kernels import _C; print('maws_kernels._C:', _C.__file__)" >>"$EXT/build_ext.log" 2>&1
        rc=$?
    elif [ "$rc" -eq 0 ]; then
        rc=1; echo "gpu_tier: the build wrote no _C*.so" >>"$EXT/build_ext.log"
    fi
    cp "$EXT/build_ext.log" "$LOGS/build_ext.log"
    [ "$rc" -eq 0 ] || status=1
    summary+=("$(printf '%-22s %-8s rc=%-3s %4s s  %s' build_ext "$([ $rc -eq 0 ] && echo OK || echo FAILED)" "$rc" \
        "$((SECONDS - t0))" "$(grep -v '^\s*$' "$LOGS/build_ext.log" | tail -n 1 | cut -c1-100)")")
    pack
    return "$rc"
}

link_fmnist() {  # the carried copy where the tests and the loader look (Debian's path)
    [ "$dry" = 1 ] && { for f in $FMNIST_FILES; do [ -f "$CARRY/fashion-mnist/$f" ] || dry_fail "$CARRY/fashion-mnist/$f is not there: run bash scripts/gpu_tier.sh prepare"; done; return 0; }
    if [ -f "$FMNIST_SRC/train-images-idx3-ubyte.gz" ]; then echo "fashion-mnist: $FMNIST_SRC"; return 0; fi
    if [ -d "$CARRY/fashion-mnist" ]; then
        mkdir -p "$(dirname "$FMNIST_SRC")" && ln -sfn "$REPO/$CARRY/fashion-mnist" "$FMNIST_SRC" \
            && echo "fashion-mnist: linked $FMNIST_SRC -> $CARRY/fashion-mnist" && return 0
    fi
    echo "fashion-mnist: NOT available (carry .carry after 'bash scripts/gpu_tier.sh prepare'): its GPU tests skip"
}

setup() {
    [ "$dry" = 1 ] && return 0
    rm -rf "$LOGS"; mkdir -p "$LOGS" "$OUT"
    trap 'pack' EXIT
    {
        date -u; nvidia-smi; echo
        "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, '| device', torch.cuda.get_device_name(0), '|', torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
        "$PY" -c "import maws_kernels, maws_fast; print('maws_kernels', maws_kernels.__version__, 'from', maws_kernels.__file__)"
        git -C "$REPO" log -1 --format='commit %h %s' 2>/dev/null || echo "commit: (no git on the device)"
        for t in compute-sanitizer nvcc; do command -v "$t" >/dev/null && echo "$t: $(command -v $t)" || echo "$t: not found"; done
        "$PY" -c "import xdist; print('pytest-xdist', xdist.__version__)" 2>/dev/null || echo "pytest-xdist: not installed"
        link_fmnist
    } >"$LOGS/env.txt" 2>&1
    tail -n 12 "$LOGS/env.txt"
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" >/dev/null 2>&1; then
        summary+=("gpu_tier $call: FAILED: torch sees no CUDA device here (env.txt says what there is); nothing run")
        pack; printf '%s\n' "${summary[@]}"; exit 1
    fi
    local device; device=$(grep -m1 -o '| device [^|]*' "$LOGS/env.txt" | cut -c10-)
    summary+=("gpu_tier $call on ${device:-(no CUDA device found)}: step, verdict, rc, seconds, last log line")
    pack
}

STEP_JSON=$LOGS/step.json
no_ext() { for n in "$@"; do summary+=("$(printf '%-22s %-8s %s' "$n" SKIPPED "maws_kernels._C did not build: see build_ext.log")"); done; }
setup
if [ "$call" = first ]; then
    build_ext_bg
    # what this machine is and whether every kernel runs at all, first: its JSON lands even if a later step hangs
    step doctor 60 "$PY" -m maws_fast.cli.doctor --json "$LOGS/doctor.json"
    step kernels_vs_ref 90 "$PY" benchmarks/sanitize_kernels.py --json "$LOGS/kernels_vs_ref.json"
    step gpu_tests 170 pytest_gpu gpu_tests "gpu and not slow" tests/kernels tests/models
    step loop_tests 70 pytest_gpu loop_tests "gpu and not slow" tests/train tests/parallel/test_gpu_engine.py
    step bench_step 110 bench step --cases mae:vit_b16 --variants "official eager,ours eager,ours compile" \
        --checkpoint none --batch-size 256 --steps 10 --warmup 3 --out "$STEP_JSON" --fit-out ""
    # the steps above ran without _C (it lands only in wait_ext); the CUDA C++ twins are checked here
    if wait_ext; then
        step csrc_tests 40 pytest_gpu csrc_tests gpu tests/csrc
        step cuda_vs_ref 20 "$PY" benchmarks/sanitize_kernels.py --only cuda --json "$LOGS/cuda_vs_ref.json"
    else no_ext csrc_tests cuda_vs_ref; fi
elif [ "$call" = third ]; then
    step bench_dist_h14 200 bench dist --world 1 --preset vit_h14 --task mae --batch-size 64 --steps 10 \
        --out "$LOGS/dist.json"
    step bench_dist_2b14 150 bench dist --world 1 --preset vit_2b14 --task mae --batch-size 32 --steps 5 \
        --engines ours:3,fsdp2 --out "$LOGS/dist.json"
    step bench_train 120 bench train --preset vit_b16 --batch-size 128 --attn sdpa --kernels triton,torch \
        --out "$LOGS/train.json"
else
    build_ext_bg
    step bench_step_l16 150 bench step --cases wsp:vit_l16 --variants "official eager,ours compile" \
        --checkpoint selective,full --batch-size 256 --steps 8 --warmup 3 --out "$STEP_JSON" --fit-out ""
    # The caching allocator off: an out-of-bounds access inside one of its pooled blocks is otherwise unseen.
    # The Triton kernels first (the build may still run), then the CUDA C++ twins once _C landed.
    step memcheck 110 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        --print-limit 20 "$PY" benchmarks/sanitize_kernels.py --pin-attention --json "$LOGS/memcheck.json"
    if wait_ext; then
        step memcheck_cuda 30 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
            --error-exitcode 1 --print-limit 20 "$PY" benchmarks/sanitize_kernels.py --only cuda \
            --json "$LOGS/memcheck_cuda.json"
        step racecheck 40 compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 \
            "$PY" benchmarks/sanitize_kernels.py --only cuda --json "$LOGS/racecheck.json"
    else no_ext memcheck_cuda racecheck; fi
    step slow_gpu_tests 60 pytest_gpu slow_gpu_tests "gpu and slow" tests
    step bench_kernels 90 bench kernels --models vit_b16,vit_l16 --dtypes bf16 --out "$LOGS/{group}.json"
    step bench_data 40 bench data --device cuda --providers dali,pil,nvjpeg --images 2048 --batch-size 256 \
        --threads 16 --out "$LOGS/data.json"
fi

if [ "$dry" = 1 ]; then
    prepare >/dev/null || dry_fail "prepare failed"  # idempotent; refreshes the commit the rows will name
    link_fmnist
    # Each maws-bench command through the real parser (argument names and choices), in one process.
    benches=()
    for p in "${planned[@]}"; do
        cmd=${p#*|}
        case "$cmd" in bench\ *) benches+=("${cmd#bench }") ;; esac
    done
    parse=$("$PY" - "${benches[@]}" <<'PYEOF' 2>&1
import shlex, sys
from maws_fast.cli.bench import bench_parser
for line in sys.argv[1:]:
    words = shlex.split(line)  # the step's words as the step gets them (printf %q quoted them)
    try:
        bench_parser().parse_args(words)
    except SystemExit:
        print(f"maws-bench {line!r} does not parse"); sys.exit(1)
PYEOF
) || dry_fail "$parse"
    size=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } 2>/dev/null | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
    size=$((size + $(du -sb "$CARRY" | cut -f1)))
    # 64 MiB travel at most; 4 MiB kept free for what the session adds before the call
    [ "$size" -lt $((60 * 1024 * 1024)) ] || dry_fail "the call would carry $((size / 1048576)) MiB (keep it under 60; the limit is 64)"
    for p in "${planned[@]}"; do echo "would run: ${p%%|*}: ${p#*|}"; done
    if [ ${#dry_problems[@]} -gt 0 ]; then
        printf 'gpu_tier --dry-run %s: %s\n' "$call" "${dry_problems[@]}" >&2; exit 1
    fi
    echo "gpu_tier --dry-run $call: OK (${#planned[@]} steps, $((size / 1048576)) MiB carried)"
    exit 0
fi

summary+=("gpu_tier $call: $([ $status -eq 0 ] && echo OK || echo FAILED) in $SECONDS s")
pack
printf '%s\n' "${summary[@]}"
exit $status
