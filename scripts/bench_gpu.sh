#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md, in parts that each fit in one sitting:
#
#   scripts/bench_gpu.sh DATA OUT_DIR [PART ...]        (no PART: all of them, in this order)
#
#   env                  GPU, driver, torch / CUDA / DeepSpeed versions       -> OUT_DIR/env.txt
#   speedrun94           configs/speedrun94.json, 10 seeds, against airbench94 on the same data (needs airbench)
#   speedrun94_doctor    the same with the per-step stability checks on (what they cost), 10 seeds
#   speedrun94_compile   the same with trainer.compile=true, 5 seeds (compile time reported apart)
#   resnet18             configs/resnet18_speedrun10.json (the speedrun log's recipe), 10 seeds
#   resnet18_fast        the same without the per-step checks, channels_last, 3 seeds
#   bn_cnn               configs/bn_cnn_stable.json (the DeepSpeed write-up's recipe), 10 seeds
#   bn_cnn_fast          the same without the per-step checks, channels_last, 3 seeds
#
# Each part writes OUT_DIR/PART.json (bench.py's report) and appends its output to OUT_DIR/log.txt; a part
# that fails is logged and the next one runs. BENCH_ARGS (e.g. "--seeds 1", split on blanks) is appended to
# every bench.py call; PYTHON picks the interpreter (default python3). Exit 1 if a part failed.
# A part too long for one sitting runs in halves into two OUT_DIRs, BENCH_ARGS="--seeds 5" and then
# BENCH_ARGS="--seeds 5 --first-seed 5", joined by: scripts/bench.py --merge A/PART.json B/PART.json --json PART.json
set -uo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 DATA OUT_DIR [PART ...]" >&2
    exit 2
fi
data=$1 out=$2
shift 2
parts=("$@")
known=" env speedrun94 speedrun94_doctor speedrun94_compile resnet18 resnet18_fast bn_cnn bn_cnn_fast "
# shellcheck disable=SC2206
[ ${#parts[@]} -gt 0 ] || parts=($known)
for part in "${parts[@]}"; do
    if [[ $known != *" $part "* ]]; then
        echo "error: unknown part $part; the parts are:$known" >&2
        exit 2
    fi
done
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
log=$out/log.txt
read -r -a extra <<< "${BENCH_ARGS:-}"
failed=0

bench() {  # bench NAME ARGS...: one bench.py report
    local name=$1
    shift
    echo "== $name: bench.py $* ${extra[*]-}" | tee -a "$log"
    "$py" "$here/scripts/bench.py" --data-dir "$data" --json "$out/$name.json" "$@" ${extra[@]+"${extra[@]}"} 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "== $name failed (exit $rc)" | tee -a "$log"
        failed=1
    fi
}

fast=(--set trainer.stability.enabled=false --set trainer.channels_last=true)
# The long recipes' warm-up run trains on 5,008 images: the same last batch as 50,000 at batch 32 and 64 (16
# images), so the counted runs meet no batch shape that cuDNN has not tuned for yet.
warm=5008
for part in "${parts[@]}"; do
    case $part in
        env)
            { date -u; nvidia-smi || true
              "$py" -c "import sys, torch, deepspeed; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'deepspeed', deepspeed.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"; } > "$out/env.txt" 2>&1
            cat "$out/env.txt" >> "$log" ;;
        speedrun94) bench "$part" --seeds 10 --vs-airbench ;;
        speedrun94_doctor) bench "$part" --seeds 10 --set trainer.stability.enabled=true ;;
        speedrun94_compile) bench "$part" --seeds 5 --set trainer.compile=true ;;
        resnet18) bench "$part" --config "$here/configs/resnet18_speedrun10.json" --seeds 10 --warmup-images "$warm" ;;
        resnet18_fast) bench "$part" --config "$here/configs/resnet18_speedrun10.json" --seeds 3 --warmup-images "$warm" \
                           "${fast[@]}" ;;
        bn_cnn) bench "$part" --config "$here/configs/bn_cnn_stable.json" --seeds 10 --warmup-images "$warm" ;;
        bn_cnn_fast) bench "$part" --config "$here/configs/bn_cnn_stable.json" --seeds 3 --warmup-images "$warm" \
                         "${fast[@]}" ;;
    esac
done
exit $failed
