#!/usr/bin/env bash
# The GPU tier, in as few device calls as possible (each call may run 10 minutes).
#
#   bash scripts/gpu_tier.sh build      # build maws_kernels._C (kept between calls on a warm machine)
#   bash scripts/gpu_tier.sh test       # build + every GPU-marked test
#   bash scripts/gpu_tier.sh sanitize   # build + compute-sanitizer memcheck and racecheck on every fused kernel
#   bash scripts/gpu_tier.sh step       # build + GPU tests of the step's kernels + sanitizer + maws-bench step (one call)
#   bash scripts/gpu_tier.sh compiled   # build + block-options GPU tests + maws-bench step: compiled and selective-
#                                       # checkpointed steps vs the official eager / compile at B/16 MAE and L/16 WSP
#   bash scripts/gpu_tier.sh kernels-dist  # build + GPU tests of maws_kernels.nn / optim / patch_timm + sanitizer + AdamW bench
#   bash scripts/gpu_tier.sh lit        # build + GPU tests of varlen attention, the text tower and the contrastive loss
#                                       # + compute-sanitizer + the contrastive loss vs eager (time, peak memory)
#   bash scripts/gpu_tier.sh bench      # build + kernel benchmarks (B/16, L/16, H/14 at batch 256) + train step + data + dist
#   bash scripts/gpu_tier.sh all        # all of the above
#
# Logs and results go to $OUT (default ./gpu_out): <step>.log, kernels.json, train.json, data.json. Copy the
# JSON rows into benchmarks/results/ and run benchmarks/render_tables.py to update the README.
# Uses the machine's own torch (a CUDA build); installs nothing from the network.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
status=0

step() {  # step NAME CMD...: run, log to $OUT/NAME.log, show the tail, remember a failure
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - t0)) s"; tail -n 4 "$OUT/$name.log" | sed 's/^/   /'
    [ "$rc" -eq 0 ] || status=1
}

build() {
    nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
        | tee "$OUT/versions.txt"
    # --no-build-isolation: the extension build needs the machine's CUDA torch (see kernels/setup.py).
    # The trainer without its dependencies (its by-path kernels copy included), then the kernels
    # editable, which builds maws_kernels._C into kernels/.
    step build_trainer "$PY" -m pip install --no-deps --no-build-isolation -e .
    step build "$PY" -m pip install --no-deps --no-build-isolation -e ./kernels
    "$PY" -c "from maws_kernels import _C; print('maws_kernels._C:', _C.__file__)" || status=1
}

bench_main() { "$PY" -c "import sys; from maws_fast.cli import bench_main; sys.exit(bench_main(sys.argv[1:]))" "$@"; }

build
case "$what" in build) ;; test | all)
    step gpu_tests "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
    step compile "$PY" benchmarks/compile_kernels.py --full --json "$OUT/compile_sm90.json" ;;
esac
case "$what" in step)
    # issue 13's one call: the new kernels' GPU tests, compute-sanitizer, then the step benchmark
    step gpu_tests_step "$PY" -m pytest -q -m gpu tests/kernels/test_bias_gelu.py tests/kernels/test_add_layer_norm.py \
        tests/kernels/test_attention.py tests/models -p no:cacheprovider
    step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" benchmarks/sanitize_kernels.py
    step bench_step bench_main step --cases mae:vit_b16 --batch-size 256 --steps 20 --out "$OUT/step.json" ;;
esac
case "$what" in compiled)
    # issue 15's one call: compile + checkpointing on the GPU (tests), then the measured step with peak memory
    step gpu_tests_blocks "$PY" -m pytest -q -m gpu tests/models/test_block_options.py tests/train/test_loop.py -p no:cacheprovider
    step bench_step_compiled bench_main step --cases mae:vit_b16,wsp:vit_l16 \
        --variants "official eager,official compile,ours eager,ours compile" --checkpoint none,selective \
        --batch-size 256 --steps 10 --warmup 3 --out "$OUT/step.json" ;;
esac
case "$what" in lit)
    # issue 18's one call: the LiT pieces on the GPU (packed varlen attention in the text tower, bf16), the
    # contrastive loss's GPU tests, compute-sanitizer, then its benchmark against the eager loss
    step gpu_tests_lit "$PY" -m pytest -q -m gpu tests/kernels/test_attend_varlen.py tests/models/test_text_tower.py \
        tests/kernels/test_contrastive.py tests/kernels/test_attention.py -p no:cacheprovider
    step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" benchmarks/sanitize_kernels.py
    step bench_contrastive bench_main kernels --ops contrastive --out "$OUT/{group}.json" ;;
esac
case "$what" in kernels-dist)
    # issue 17's one call: the modules, FusedAdamW and the timm patch on the GPU, then compute-sanitizer
    # (the multi-tensor AdamW kernel is new) and the AdamW kernel benchmark
    step gpu_tests_kernels_dist "$PY" -m pytest -q -m gpu tests/kernels/test_optim.py tests/kernels/test_nn.py \
        tests/kernels/test_patching.py tests/kernels/test_adamw.py -p no:cacheprovider
    step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" benchmarks/sanitize_kernels.py
    step bench_adamw_contrastive bench_main kernels --ops adamw,contrastive --out "$OUT/{group}.json" ;;
esac
case "$what" in sanitize | all)
    for tool in memcheck racecheck; do
        step "$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" benchmarks/sanitize_kernels.py
    done ;;
esac
case "$what" in bench | all)
    step bench_kernels bench_main kernels --out "$OUT/{group}.json"
    step bench_step bench_main step --batch-size 256 --out "$OUT/step.json"
    step bench_train bench_main train --preset vit_b16 --batch-size 128 --attn sdpa --kernels triton,torch \
        --out "$OUT/train.json"
    # DALI mixed decode where the wheel is installed (it is ~200 MB: a device call carries 64 MiB),
    # else the nvJPEG row (torchvision decode_jpeg on the GPU) stands in; PIL is the baseline.
    step bench_data bench_main data --device cuda --providers dali,dali_uint8,pil,nvjpeg --images 4096 \
        --batch-size 256 --threads 16 --out "$OUT/data.json"
    step bench_data_ft bench_main data --device cuda --providers dali,pil --transform finetune --images 4096 \
        --batch-size 256 --threads 16 --out "$OUT/data.json"
    # Engines on one H100 (world 1, NCCL): ours ZeRO-1/2/3 vs FSDP2 vs DDP step time and peak memory at the
    # largest MAE that fits (H/14 in bf16; 2B/14 tried after it, its failure is logged, not fatal).
    step bench_dist_h14 bench_main dist --world 1 --preset vit_h14 --task mae --batch-size 64 --steps 10 \
        --out "$OUT/dist.json"
    step bench_dist_2b14 bench_main dist --world 1 --preset vit_2b14 --task mae --batch-size 32 --steps 5 \
        --engines ours:3,fsdp2 --out "$OUT/dist.json" ;;
esac
echo "gpu_tier $what: $([ $status -eq 0 ] && echo OK || echo FAILED) (logs in $OUT)"
exit $status
