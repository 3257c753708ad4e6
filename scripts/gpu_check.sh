#!/usr/bin/env bash
# One GPU session -> every GPU figure, within one time cap:
#
#   scripts/gpu_check.sh OUT_DIR [--budget-s S] [--data PATH] [--dry-run] [--parts "PART ..."]   (make gpu-check)
#
# Parts, in this order; each writes its file as soon as it ends (a command killed at its limit keeps them):
#   setup       the wheels of ../shared/tools/device-wheels (.whl/), installed where deepspeed is missing
#   env         OUT_DIR/env.json: GPU, driver, Python, torch / CUDA / cuDNN, DeepSpeed, Accelerate, airbench
#   data        the decoded-data cache, from the archive (never an extracted folder: 60k files to stat per load)
#   tests       OUT_DIR/gpu-tests.xml (junit) and gpu-tests.log: pytest -m gpu; the runs' summaries in OUT_DIR/runs/
#   speedrun94  OUT_DIR/speedrun94.json: configs/speedrun94.json against airbench94, 10 seeds (scripts/bench.py)
#   resnet18    OUT_DIR/resnet18.json: configs/resnet18_speedrun10.json, as many seeds as the time left allows
#   bn_cnn      OUT_DIR/bn_cnn.json: configs/bn_cnn_stable.json, likewise
#   resnet9     OUT_DIR/resnet9.json: ds_config.json (the default run, ResNet-9, 24 epochs), likewise
# --parts picks among those after data (default: all of them) and these, for a later sitting (no target; 3-5 seeds):
#   speedrun94_doctor  speedrun94_compile   the speed preset with the per-step checks on; with trainer.compile=true
#   resnet18_fast      bn_cnn_fast          the recipes without the per-step checks, channels_last
# OUT_DIR/kit.json says what each part did and how long it took; OUT_DIR/log.txt has everything printed.
#
# --budget-s (default 480): the whole stays under it, so that one 10-minute device command holds the kit with the
# machine's start-up; each part gets at most its share of what is left and stops cleanly (pytest at a timeout,
# bench.py with --budget-s). --data: the CIFAR-10 archive (default data/cifar10-jpeg.tar.gz). Without CUDA the kit
# says so in one line and exits 2; --dry-run runs every part at toy size on the CPU and writes the same files (the
# plumbing, tested in CI). PYTHON picks the interpreter (default python3).
set -uo pipefail
usage="usage: $0 OUT_DIR [--budget-s S] [--data PATH] [--dry-run] [--parts \"PART ...\"]"
main_parts="tests speedrun94 resnet18 bn_cnn resnet9"
known=" $main_parts speedrun94_doctor speedrun94_compile resnet18_fast bn_cnn_fast "
[ $# -ge 1 ] && [[ $1 != -* ]] || { echo "$usage" >&2; exit 2; }
out=$1
shift
budget=480 data=data/cifar10-jpeg.tar.gz dry=0 parts_asked=$main_parts
while [ $# -gt 0 ]; do
    case $1 in
        --budget-s) budget=${2:?$usage}; shift 2 ;;
        --data) data=${2:?$usage}; shift 2 ;;
        --dry-run) dry=1; shift ;;
        --parts) parts_asked=${2:?$usage}; shift 2 ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
done
for part in $parts_asked; do
    [[ $known == *" $part "* ]] || { echo "gpu_check: unknown part $part; the parts are:$known" >&2; exit 2; }
done
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here" || exit 2
start=$SECONDS
mkdir -p "$out"
log=$out/log.txt
: > "$log"
parts=()

left() { echo $((budget - (SECONDS - start))); }
say() { echo "$*" | tee -a "$log"; }
record() {  # record PART STATUS SECONDS: one entry of kit.json, rewritten after every part
    parts+=("{\"part\": \"$1\", \"status\": \"$2\", \"seconds\": $3}")
    local IFS=,
    printf '{"budget_s": %s, "dry_run": %s, "data": "%s", "parts": [%s]}\n' "$budget" \
        "$([ $dry = 1 ] && echo true || echo false)" "$data" "${parts[*]}" > "$out/kit.json"
}
run_part() {  # run_part NAME SECONDS_CAP COMMAND...: run, log, record
    local name=$1 cap=$2 t0=$SECONDS status=ok
    shift 2
    if [ "$cap" -le 0 ]; then
        say "== $name: skipped, no time left"
        record "$name" skipped 0
        return
    fi
    say "== $name (at most ${cap}s): $*"
    timeout -s INT -k 30 "$cap" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || status="failed (exit $rc)"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ] && status="stopped at its time cap"
    say "== $name: $status in $((SECONDS - t0))s"
    record "$name" "$status" $((SECONDS - t0))
}

if [ -d .whl ] && ! "$py" -c "import deepspeed" 2>/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tee -a "$log"
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
    record setup ok $((SECONDS - start))
fi
if [ $dry = 0 ] && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): run it on a GPU machine, or pass --dry-run" \
         "to rehearse every part on this CPU" >&2
    exit 2
fi
[ -e "$data" ] || { echo "gpu_check: no data at $data: pass --data PATH (the CIFAR-10 archive)" >&2; exit 2; }

"$py" - "$out/env.json" <<'EOF' 2>&1 | tee -a "$log"
import json, platform, subprocess, sys, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for pkg in ("deepspeed", "accelerate", "airbench"):
    try:
        info[pkg] = __import__(pkg).__version__
    except Exception as e:
        info[pkg] = f"missing ({type(e).__name__})"
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip() or None
except OSError:
    info["driver"] = None
open(sys.argv[1], "w").write(json.dumps(info, indent=2) + "\n")
print(json.dumps(info))
EOF
record env ok $((SECONDS - start))
run_part data "$(left)" "$py" scripts/prepare_data.py --data-dir "$data" --no-download

export CIFAR10DS_DATA=$data CIFAR10DS_GPU_OUT=$out
if [ $dry = 1 ]; then  # toy size: one short seed each, no airbench (it needs a GPU)
    toy=(--seeds 1 --no-warmup --set trainer.epochs=1 --set trainer.data.download=false --set train_batch_size=40
         --set trainer.data.train_limit=80 --set trainer.data.test_limit=40)
    speed=("${toy[@]}") recipe=("${toy[@]}") bn_cnn=("${toy[@]}" --set trainer.warmup_epochs=0.5) few=()
else
    speed=(--seeds 10 --vs-airbench)
    recipe=(--seeds 10 --warmup-images 5008)  # the warm-up run meets the full set's last batch shape
    bn_cnn=("${recipe[@]}") few=(--seeds 3)
fi
fast=(--set trainer.stability.enabled=false --set trainer.channels_last=true)
bench() {  # bench NAME CAP ARGS...
    local name=$1 cap=$2
    shift 2
    run_part "$name" "$cap" "$py" scripts/bench.py --data-dir "$data" --json "$out/$name.json" --budget-s "$cap" "$@"
}
set -- $parts_asked
while [ $# -gt 0 ]; do
    part=$1 share=$(( $(left) / $# ))  # an equal share of what is left; the tests and P1 come first
    shift
    case $part in
        tests) run_part tests $(( $(left) * 2 / 5 )) "$py" -m pytest -q -m gpu tests/test_gpu.py \
                   --junitxml="$out/gpu-tests.xml" -o junit_family=xunit1 -p no:cacheprovider ;;
        speedrun94) bench "$part" $(( $(left) / 2 )) --config configs/speedrun94.json "${speed[@]}" ;;
        resnet18) bench "$part" "$share" --config configs/resnet18_speedrun10.json "${recipe[@]}" ;;
        bn_cnn) bench "$part" "$share" --config configs/bn_cnn_stable.json "${bn_cnn[@]}" ;;
        resnet9) bench "$part" "$share" --config ds_config.json "${recipe[@]}" ;;
        speedrun94_doctor) bench "$part" "$share" --config configs/speedrun94.json "${speed[@]}" "${few[@]}" \
                               --set trainer.stability.enabled=true ;;
        speedrun94_compile) bench "$part" "$share" --config configs/speedrun94.json "${speed[@]}" "${few[@]}" \
                                --set trainer.compile=true ;;
        resnet18_fast) bench "$part" "$share" --config configs/resnet18_speedrun10.json "${recipe[@]}" "${few[@]}" \
                           "${fast[@]}" ;;
        bn_cnn_fast) bench "$part" "$share" --config configs/bn_cnn_stable.json "${bn_cnn[@]}" "${few[@]}" "${fast[@]}" ;;
    esac
done
say "== done in $((SECONDS - start))s of ${budget}s: $out/kit.json"
