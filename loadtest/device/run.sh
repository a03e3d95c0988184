#!/usr/bin/env bash
# Every GPU check of the serving issue in one device call (the lent machine gives a session
# 15 minutes, one command at most 10): run as the last of the calls .gpustage/CALLS lists
# (made by loadtest/device/stage.sh), in the repository root, with $OUT set by the tool.
#
# Stages, in order, each bounded by what is left of RUN_BUDGET_S (gpu_bench by what the
# last, which runs whole or not at all, leaves it); a stage that fails or times out is logged
# and the next one runs, and those cut short keep what they measured (gpu_bench rewrites
# its JSON after every figure; the served benchmark gets the time left as its own budget):
#   1. NVML: the real-device test of inference_gpu_memory_used_bytes (pytest -m gpu);
#   2. export of both models (fp32, fp16) with the device's torch;
#   3. export.gpu_check: fp16/fp32 CUDA + IOBinding parity against onnxruntime CPU fp32
#      (what makes the engine's GPU numbers worth reading);
#   4. loadtest.gpu_bench: Transformer-base and en-es, PyTorch vs HF generate fp16 vs the
#      serving engine on the CUDA provider (the >= 10x HF generate target) with its steps
#      replayed as CUDA graphs and without (same tokens checked, host share of a step),
#      with rooflines, and the bare decoder step plain and as a CUDA graph;
#   5. loadtest.bench --provider cuda: served static vs continuous batching on the GPU.
# What comes back in $OUT (7 files; the tool brings back 8 at most): run.log,
# benchmarks.md (docs/benchmarks.md with the GPU sections filled), gpu_bench.json,
# bench_gpu.json, gpu_check.md, gpu_check.json, and bench-logs.txt (the ends of the served
# benchmark's phase and server logs: a CUDA graph fallback is logged there).
# Here, afterwards: copy benchmarks.md over docs/benchmarks.md, gpu_check.md to docs/, and
# the JSON files to docs/ beside them (a gpu_bench.json marked "partial": record it with
# `python -m loadtest.gpu_bench --record docs/benchmarks.md --from-json FILE`).
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?run this through the device tool, which sets OUT}"
budget_s="${RUN_BUDGET_S:-570}"
start=$(date +%s)
stage=.gpustage
logf="$OUT/run.log"

log() { echo "[device +$(($(date +%s) - start))s] $*" | tee -a "$logf"; }
left() { echo $((budget_s - ($(date +%s) - start))); }

# run_stage NAME SECONDS CMD...: run CMD for at most SECONDS (less if less is left).
run_stage() {
  local name="$1" want="$2" have
  shift 2
  have=$(left)
  [ "$want" -gt "$have" ] && want=$have
  if [ "$want" -lt 20 ]; then
    log "$name: skipped, ${want}s for it (${have}s left)"
    return 0
  fi
  log "$name: start (at most ${want}s)"
  timeout --kill-after=10 "$want" "$@" >>"$logf" 2>&1
  log "$name: exit $?"
}

nvidia-smi >>"$logf" 2>&1 || log "nvidia-smi failed"

# REHEARSAL=1 runs the stages with the python3 on PATH and nothing staged (on a CPU:
# every stage must then fail or skip with its reason; it checks the commands). The stages
# export into and read the model repository `repo`: on the device the carried checkout's
# models/, in a rehearsal a scratch copy of the checkpoints, so the exports of the checkout
# it runs in (the CPU variants `make serve` uses) stay as they are.
repo=models
if [ -n "${REHEARSAL:-}" ]; then
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
  repo="$scratch/models"
  for checkpoint in models/*/checkpoint; do
    name="$(basename "$(dirname "$checkpoint")")"
    mkdir -p "$repo/$name" && cp -r "$checkpoint" "$repo/$name/"
  done
fi
if [ -z "${REHEARSAL:-}" ]; then
  if [ ! -d /root/ortgpu/onnxruntime ]; then
    if ! echo "$(cat "$stage/ort.sha256")  /root/ort.tar.xz" | sha256sum -c --quiet - >>"$logf" 2>&1; then
      log "/root/ort.tar.xz is incomplete: the part calls of .gpustage/CALLS must run first, each within the warm time of the last"
      exit 3
    fi
    mkdir -p /root/ortgpu && tar xJf /root/ort.tar.xz -C /root/ortgpu || { log "unpacking failed"; exit 3; }
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$stage"/wheels/*.whl >>"$logf" 2>&1 || { log "wheel install failed"; exit 3; }
  export PYTHONPATH="$PWD:/root/ortgpu:/tmp/site" PYTHONUNBUFFERED=1
else
  export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
fi
python3 -c 'import onnxruntime as o; o.preload_dlls(); print("onnxruntime", o.__version__, o.get_available_providers())' 2>&1 | tee -a "$logf"
cp docs/benchmarks.md "$OUT/benchmarks.md"

run_stage nvml 30 python3 -m pytest -q -m gpu -p no:cacheprovider tests/service/test_gpu.py

# gpu_check and the served benchmark read exported versions (build outputs, not carried).
# The TorchScript exporter first, as gpu_bench's own export: here it exports en-es (fp32,
# fp16) in 8 s against dynamo's 41 s, and tests/export/test_dynamo.py proves the two
# exports decode alike; dynamo where the device's torch (not the one we pin) lacks it.
export_cmd="python3 -m export --repository $repo --variants fp32,fp16 --replace"
run_stage export 80 sh -c "$export_cmd --exporter torchscript || $export_cmd --force"

mkdir -p /tmp/verses && cp tests/fixtures/verses.tsv /tmp/verses/pairs.test.tsv
run_stage gpu_check 60 python3 -m export.gpu_check --version-dir "$repo/en-es/1" \
  --data /tmp/verses --verses 100 --batches 1,64 --out "$OUT/gpu_check.md" \
  --json-out "$OUT/gpu_check.json"

# The served benchmark runs whole or not at all: loadtest.bench skips it below
# served_need_s at its arguments (184 s), and the stage keeps 10 s and its --max-minutes
# 40 s more. gpu_bench, which keeps every figure it measured, gives up what that needs.
served_floor_s=245
gpu_bench_s=$(($(left) - served_floor_s))
[ "$gpu_bench_s" -gt 150 ] && gpu_bench_s=150
run_stage gpu_bench "$gpu_bench_s" python3 -m loadtest.gpu_bench --configs base,en-es --batches 1,64 \
  --hf-batches 64 --repeats 2 --out "$OUT/gpu_bench.json" --record "$OUT/benchmarks.md"

# The served benchmark skips the phases that would not fit its own budget: the time left,
# less a margin to stop its servers and write its results before the stage's limit. It
# reads the test fixture's verses, in a rehearsal too: data/ is not carried.
rm -rf /tmp/bench-work
served_s=$(($(left) - 10))
served_min=$(awk -v s="$served_s" 'BEGIN { m = (s - 40) / 60; printf "%.2f", m < 0.5 ? 0.5 : m }')
run_stage served "$served_s" python3 -m loadtest.bench --provider cuda --repository "$repo" \
  --inputs tests/fixtures/verses.tsv --skip static-hold,static-padded --batch-size 64 --served-s 10 --poisson-s 6 --poisson-fractions 0.4,0.8 \
  --generate-fractions 0.5 --max-minutes "$served_min" --work-dir /tmp/bench-work \
  --out-md "$OUT/benchmarks.md" --out-json "$OUT/bench_gpu.json"
# Its logs' ends only, in one file (the tool brings back 8 files at most): its scratch
# also holds converted models, too big to bring back.
for f in /tmp/bench-work/*.log; do
  [ -f "$f" ] && { echo "=== $(basename "$f") (its last 100,000 bytes)"; tail -c 100000 "$f"; }
done >"$OUT/bench-logs.txt"
rm -f "$OUT"/*.writing  # writes a stage's timeout cut: the JSON written before stands

log "done"
