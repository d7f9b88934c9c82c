#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in phases that each fit one call of the device tool.
#
# On the lent GPU machine (torch, triton, matplotlib, tqdm, pytest-xdist are installed there), from the
# repository root, with the CIFAR-10 JPEG archive carried in the git-ignored folder .gpu/:
#
#   mkdir -p .gpu && cp ../shared/data/cifar10-jpeg.tar.gz .gpu/         # here, once
#   run(command="bash scripts/gpu_session.sh check",    carry=[".gpu"])   # CUDA tests, kernel tables + targets
#   run(command="bash scripts/gpu_session.sh losses",   carry=[".gpu"])   # CRD, cohort, methods, trainer step
#   run(command="bash scripts/gpu_session.sh trainers", carry=[".gpu"])   # tutorial x3 seeds, Imagenette timing
#   run(command="bash scripts/gpu_session.sh methods",  carry=[".gpu"])   # one short run per method beside KD
#
# A phase stops starting steps once PHASE_BUDGET seconds (default 540, under the tool's 600 s per
# call) are used, and cuts each step's own limit to what is left. A session's 30 minutes of device
# time hold about three phases, machine start included. Results are packed after every step into
# $OUT/<phase>.tar.gz (logs, JSON, Markdown tables, run results) and $OUT/<phase>-summary.txt
# (exit status and wall time of every step, then the tail of each log), so a phase cut short
# still returns what it measured. A step that fails or times out is recorded and the phase goes on.
# Without $OUT the results go to runs/gpu-session/; DRY_RUN=1 only prints the steps.
set -uo pipefail

PHASE="${1:-}"
DRY="${DRY_RUN:-0}"
OUT_DIR="${OUT:-runs/gpu-session}"
RES="$(mktemp -d)/${PHASE:-none}"
mkdir -p "$RES" "$OUT_DIR"
export PYTHONPATH=.
PY="${PYTHON:-python3}"
SUMMARY="$RES/summary.txt"
DATA=/tmp/cifar10-jpeg
SYNTH="${SYNTH:-/tmp/imagenette-synthetic}"
BUDGET="${PHASE_BUDGET:-540}"
DEADLINE=$(($(date +%s) + BUDGET))

pack() { # the summary, the tails of the logs and everything measured so far, into $OUT_DIR
    {
        cat "$SUMMARY"
        for log in "$RES"/*.log; do
            if [ -f "$log" ]; then
                echo "---- $(basename "$log") (tail)"
                tail -n 25 "$log"
            fi
        done
    } >"$OUT_DIR/$PHASE-summary.txt"
    # checkpoints and generated image trees are large and not needed in the report
    tar -czf "$OUT_DIR/$PHASE.tar.gz.tmp" --exclude=checkpoints --exclude=synthetic \
        -C "$(dirname "$RES")" "$PHASE" && mv "$OUT_DIR/$PHASE.tar.gz.tmp" "$OUT_DIR/$PHASE.tar.gz"
}

step() { # step NAME SECONDS COMMAND...: run with a time limit, log to $RES/NAME.log, record rc and time
    local name="$1" limit="$2"
    shift 2
    echo "== $name: $*" | tee -a "$SUMMARY"
    if [ "$DRY" = 1 ]; then
        return 0
    fi
    local left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 20 ]; then
        echo "   skipped: the phase budget of ${BUDGET}s is used up" | tee -a "$SUMMARY"
        return 0
    fi
    if [ "$limit" -gt "$left" ]; then
        limit=$left
    fi
    local t0 rc
    t0=$(date +%s)
    timeout "$limit" "$@" >"$RES/$name.log" 2>&1
    rc=$?
    echo "   rc=$rc wall=$(($(date +%s) - t0))s (limit ${limit}s)" | tee -a "$SUMMARY"
    pack
}

cifar_data() {
    if [ "$DRY" != 1 ] && [ ! -d "$DATA/train" ]; then
        mkdir -p "$DATA" && tar -xzf .gpu/cifar10-jpeg.tar.gz -C "$DATA"
    fi
}

case "$PHASE" in
check)
    step env 60 "$PY" -c "import torch, torchvision, triton, platform; print(platform.python_version(), \
torch.__version__, torchvision.__version__, triton.__version__, torch.cuda.get_device_name(), torch.version.cuda)"
    step nvidia-smi 30 nvidia-smi
    # every test, the CUDA-only cases included (skipped on CPU); then the kernels at the benchmark sizes
    step tests 240 "$PY" -m pytest -q -n 8 -p no:cacheprovider kdloss tests benchmarks reference_trainers -rs
    step kernel-tests-gpu 90 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py \
        tests/test_cohort_kernel.py tests/test_attention_kernel.py
    step kernels-table 150 "$PY" -m benchmarks.run_gpu --tag h100 --out-dir "$RES"
    step kernels-targets 30 "$PY" -m benchmarks.check_targets "$RES/results-h100.json"
    step kernels-eager 90 env KDLOSS_KERNELS=off "$PY" -m benchmarks.run_gpu --tag h100-eager \
        --impls kdloss --out-dir "$RES"
    ;;
losses)
    step crd 150 "$PY" benchmarks/test_bench_crd.py --device cuda --batch 64 256 --k 16384 --feat-dim 128 \
        --n-data 50000 --reps 50 --variants --json "$RES/crd_h100.json"
    step crd-bank-copy 60 "$PY" benchmarks/test_bench_crd.py --device cuda --bank-copy-ab --batch 64 256 --reps 50
    step trainer-step 90 "$PY" benchmarks/test_bench_trainer_step.py --device cuda --batch 64 512 \
        --json "$RES/trainer_step.json"
    step cohort 90 "$PY" benchmarks/test_bench_cohort.py
    step methods 90 "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_bench_methods.py --benchmark-enable \
        --benchmark-only --benchmark-json "$RES/methods.json" --benchmark-columns=median,iqr,rounds
    step trainer-step-compiled 120 "$PY" benchmarks/test_bench_trainer_step.py --device cuda --batch 512 \
        --compile --json "$RES/trainer_step_compiled.json"
    ;;
trainers)
    cifar_data
    # issue 7: phases 1-5 of the tutorial, 3 seeds (phases 1-3 train time: the sum of teacher,
    # student-ce and kd in the table; target <= 8 s, accuracies within 1 point of the source's)
    step tutorial 300 "$PY" -m reference_trainers tutorial-cifar10 --data-root "$DATA" --seeds 42,0,1 \
        --workers 8 --no-progress --out "$RES/tutorial"
    # issue 7: 5 epochs at Imagenette's shape in <= 12 s (synthetic tree, random weights: timing only);
    # the tree first (about a minute of JPEG encoding), then JPEGs decoded on the GPU (nvJPEG), then
    # the same tree decoded by the CPU workers
    step imagenette-tree 120 "$PY" -c "from pathlib import Path; from reference_trainers.recipes.hint_imagenette \
import IMAGENETTE_SHAPE as S, make_synthetic_imagefolder as make; make(Path('$SYNTH'), n_train=S['train'], \
n_val=S['val'], short_side=S['short_side'])"
    for mode in device cpu; do
        step "imagenette-$mode" 120 "$PY" -m reference_trainers hint-imagenette --data-root "$SYNTH" --random-init \
            --epochs 5 --teacher-epochs 1 --seeds 42 --workers 12 --decode "$mode" --no-progress \
            --out "$RES/imagenette-$mode"
    done
    ;;
methods)
    cifar_data
    # issue 6: one short run per method beside plain KD, same seed (CIFAR-10 JPEG: CIFAR-100 is not here);
    # issues 3 and 7: the train time of crd, at and dih against kd (target: at most 1.2x)
    step methods 540 "$PY" -m reference_trainers benchmark-cifar100 --dataset imagefolder --data-root "$DATA" \
        --teacher resnet32x4 --student resnet8x4 --teacher-epochs 15 --epochs 5 --seeds 0 --workers 8 \
        --method kd,crd,at,dih,fitnet,sp,cc,vid,rkd,pkt,ab,ft,fsp,nst,dkd,dist,reviewkd --no-progress \
        --out "$RES/methods"
    ;;
*)
    echo "usage: bash scripts/gpu_session.sh check|losses|trainers|methods   (DRY_RUN=1 prints the steps)" >&2
    exit 2
    ;;
esac

if [ "$DRY" != 1 ]; then
    pack
fi
echo "results: $OUT_DIR/$PHASE.tar.gz, $OUT_DIR/$PHASE-summary.txt"
