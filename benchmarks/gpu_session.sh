#!/usr/bin/env bash
# Everything issue 10 measures on a GPU, in parts that each fit one device call (<= 10 minutes).
#
# On the development machine, once (fills .device/original with the original's sat/ folder, which
# compare_original.py imports; never committed):
#   bash benchmarks/gpu_session.sh prepare /path/to/SihuiJi-LayerFlow   # a checkout or a bare git dir
# On the GPU machine, from the repository root, one part per call:
#   source .device/env.sh; bash benchmarks/gpu_session.sh default     # gen_rgba 50 steps, faithful, fg2bg_rgba
#   source .device/env.sh; bash benchmarks/gpu_session.sh attention   # one run per runtime.attention value
#   source .device/env.sh; bash benchmarks/gpu_session.sh presets     # memory_24gb / memory_12gb on fg2bg_rgba
#   source .device/env.sh; bash benchmarks/gpu_session.sh original    # compare_original.py at full size
# Every measurement writes <name>.json and <name>.log under $OUT (outputs/gpu_session without $OUT)
# and ends in a line of summary.tsv (name, exit status, seconds); a failing or timed-out measurement
# is recorded and the part goes on. Each part stops starting new measurements when its budget
# (PART_BUDGET_S, default 570 s) is spent. SIZE=tiny runs the same commands with the tiny model on
# the CPU: a check of the commands themselves, not a measurement.
set -uo pipefail
cd "$(dirname "$0")/.."

part=${1:-}
out=${OUT:-outputs/gpu_session}
budget=${PART_BUDGET_S:-570}
size=${SIZE:-full}
python=${PYTHON:-python3}
original=${ORIGINAL:-.device/original}

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
}

if [[ $part == prepare ]]; then
  source=${2:?"prepare needs the original: a SihuiJi/LayerFlow checkout or its git directory"}
  rm -rf .device/original.tmp && mkdir -p .device/original.tmp
  if [[ -f $source/sat/diffusion_video.py ]]; then
    (cd "$source" && tar cf - --exclude=__pycache__ sat) | tar xf - -C .device/original.tmp
  else
    git --git-dir="$source" archive HEAD sat | tar xf - -C .device/original.tmp
    find .device/original.tmp -name __pycache__ -type d -prune -exec rm -rf {} +  # the original commits some
  fi
  if [[ ! -f .device/original.tmp/sat/diffusion_video.py ]]; then
    rm -rf .device/original.tmp
    echo "error: $source: no sat/diffusion_video.py (expected a SihuiJi/LayerFlow checkout or git directory)" >&2
    exit 2
  fi
  rm -rf .device/original && mv .device/original.tmp .device/original
  if exclude=$(git rev-parse --git-path info/exclude 2>/dev/null); then  # works in a worktree too
    mkdir -p "$(dirname "$exclude")" && { grep -qx '/.device/' "$exclude" 2>/dev/null || echo '/.device/' >> "$exclude"; }
  fi
  echo "ready: .device/original ($(du -sh .device/original | cut -f1)); carry .device to the GPU machine"
  exit 0
fi

case $part in default|attention|presets|original) ;; *) usage ;; esac
mkdir -p "$out"
start=$(date +%s)
tiny=()
if [[ $size == tiny ]]; then
  tiny=(configs/tiny.yaml)
  device=cpu
else
  "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || { echo "error: no CUDA device (SIZE=tiny checks the commands on the CPU)" >&2; exit 2; }
  device=cuda
fi

# The machine, once per part.
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$python" - <<'PY'
import importlib.util, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
for name in ("flash_attn", "flash_attn.cute", "sageattention", "triton"):
    try:
        print(name, "installed" if importlib.util.find_spec(name) else "not installed")
    except ModuleNotFoundError:
        print(name, "not installed")
PY
} > "$out/machine_$part.txt" 2>&1

# measure NAME CAP_S COMMAND...: run COMMAND with at most CAP_S seconds (less if the part's budget is
# nearly spent), output in $out/NAME.log, one summary line.
measure() {
  local name=$1 cap=$2
  shift 2
  local left=$((budget - ($(date +%s) - start)))
  if ((left < 30)); then
    printf '%s\tskipped\t0\tpart budget spent\n' "$name" | tee -a "$out/summary.tsv"
    return
  fi
  ((cap > left)) && cap=$left
  local began=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$cap" "$@" > "$out/$name.log" 2>&1
  local status=$?
  local note=""
  ((status == 124 || status == 137)) && note="timed out after ${cap} s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - began))" "$note" | tee -a "$out/summary.tsv"
}

# bench NAME CAP_S TASK[+PRESET] STEPS WARMUP REPEATS [--set KEY=VALUE ...]: benchmark.py on
# model.yaml + the task file (+ configs/PRESET.yaml, merged after the task as its header says)
bench() {
  local name=$1 cap=$2 task=${3%%+*} steps=$4 warmup=$5 repeats=$6
  local files=(configs/model.yaml "configs/tasks/$task.yaml")
  [[ $3 == *+* ]] && files+=("configs/${3#*+}.yaml")
  shift 6
  measure "$name" "$cap" "$python" benchmarks/benchmark.py --base "${files[@]}" "${tiny[@]}" "$@" \
    --set model.weights=random --set "sampling.num_steps=$steps" --warmup "$warmup" --repeats "$repeats" \
    --no-write --json "$out/$name.json"
}

case $part in
  default)
    # the 50-step sample (0.60 s/step and 35 s per sample are the goals), the faithful path, and
    # fg2bg_rgba, the longest sequence and the baseline of the presets
    bench gen_rgba_default_50 300 gen_rgba 50 1 1
    bench gen_rgba_faithful_10 150 gen_rgba 10 1 1 --set runtime.faithful=true
    bench fg2bg_rgba_default_10 150 fg2bg_rgba 10 1 1
    ;;
  attention)
    # every kernel on the attention shape alone, and PyTorch's reasons for refusing a fused kernel
    tokens=()
    [[ $size == tiny ]] && tokens=(--tokens 512 --device cpu)
    measure attention_kernels 60 "$python" benchmarks/attention.py --base configs/model.yaml \
      configs/tasks/gen_rgba.yaml "${tokens[@]}" --json "$out/attention_kernels.json"
    for kernel in auto sdpa cudnn flash efficient math flash-attn-4 flash-attn-3; do
      bench "gen_rgba_attention_${kernel}_5" 90 gen_rgba 5 1 1 --set "runtime.attention=$kernel"
    done
    ;;
  presets)
    for preset in memory_24gb memory_12gb; do
      if [[ -f configs/$preset.yaml ]]; then
        bench "fg2bg_rgba_${preset}_10" 280 "fg2bg_rgba+$preset" 10 1 1
      else
        printf '%s\tskipped\t0\tconfigs/%s.yaml not found\n' "fg2bg_rgba_${preset}_10" "$preset" | tee -a "$out/summary.tsv"
      fi
    done
    ;;
  original)
    [[ -f $original/sat/diffusion_video.py ]] || { echo "error: $original: no sat/diffusion_video.py (run: bash benchmarks/gpu_session.sh prepare ...)" >&2; exit 2; }
    measure compare_original_gen_rgba_default 280 "$python" benchmarks/compare_original.py --original "$original" \
      --case gen_rgba --size "$size" --device "$device" --steps 5 --repeats 2 --warmup 1 \
      --json "$out/compare_original_gen_rgba_default.json"
    measure compare_original_gen_rgba_faithful 280 "$python" benchmarks/compare_original.py --original "$original" \
      --case gen_rgba --size "$size" --device "$device" --steps 5 --repeats 2 --warmup 1 \
      --set runtime.faithful=true --json "$out/compare_original_gen_rgba_faithful.json"
    ;;
esac
echo "part $part done in $(($(date +%s) - start)) s; logs and JSON in $out"
