#!/usr/bin/env bash
# Issue 25's device checks in one call (about 8 minutes on an H100/H200), every step a command a user could type:
#   1. bench before/after the fused forward, side by side: the eager forward at the old pass length, then the
#      fused one with 1,000-step sampling passes (the steady state), 1/2/4 trainings at once on streams, and
#      Inception bf16 against fp32 on 10,000 images;
#   2. a small study serial (--overlap off, one trial at a time) against the engine (--overlap on, two trials
#      at once in one worker): wall time, and the same FIDs within noise.
# Usage (device call, .devkit carried):  . .devkit/setup.sh && bash scripts/gpu_engine.sh "$OUT"
#        rehearsal on a CPU:             bash scripts/gpu_engine.sh /tmp/engine --rehearse
# Writes at most 8 files to OUT: bench-fused-off.json, bench-fused-on.json, study-serial.json,
# study-engine.json, engine.log, summary.txt. A failed step is logged and the next one runs. The serial study runs
# first and pays the caches (FID reference statistics): compare the trials' spans in summary.txt.
set -uo pipefail
OUT=${1:?usage: gpu_engine.sh OUT [--rehearse]}
mkdir -p "$OUT"
LOG="$OUT/engine.log"
PY=${PYTHON:-python3}
if [ "${2:-}" = "--rehearse" ]; then
  BENCH=(--device cpu --channels 8 --batch-size 16 --train-steps 2 --repeats 1 --sample-batch 8 --no-inception)
  OFF_STEPS=4 ON_STEPS=8 CHECK=(--fid-precision-check 6 --fid-ref-samples 16 --inception --fid-batch-size 8)
  CONCURRENT=1,2 STUDY_LIMIT=400
  STUDY=(--device cpu --channels 8 --batch-size 32 --epochs 2 --train-samples 128 --timesteps 200 --ddim-steps 5
    --fid-select-samples 8 --fid-samples 8 --fid-ref-samples 16 --fid-batch-size 16 --sheet-images 4)
else
  BENCH=(--repeats 2)
  OFF_STEPS=200 ON_STEPS=1000 CHECK=(--fid-precision-check 10000)
  CONCURRENT=1,2,4 STUDY_LIMIT=200
  STUDY=(--epochs 2 --train-samples 12800 --timesteps 200 --fid-select-samples 500 --fid-samples 1000)
fi
say() { echo "== $(date -u +%T) $*" | tee -a "$LOG"; }
step() {  # step NAME SECONDS CMD...: run with a time limit; log its output; go on whatever happens
  local name=$1 limit=$2; shift 2
  say "$name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  say "$name: rc $rc in $((SECONDS - t0)) s"
  echo "$name rc=$rc seconds=$((SECONDS - t0))" >>"$OUT/summary.txt"
}
{
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
} >"$OUT/summary.txt" 2>&1

step bench-fused-off 150 $PY cli.py bench "${BENCH[@]}" --fused off --sample-steps "$OFF_STEPS" \
  --json "$OUT/bench-fused-off.json"
step bench-fused-on 300 $PY cli.py bench "${BENCH[@]}" --fused on --sample-steps "$ON_STEPS" \
  --concurrent "$CONCURRENT" "${CHECK[@]}" --json "$OUT/bench-fused-on.json"

study() {  # study NAME OPTIONS...: one schedule, both samplers, its own stores
  local name=$1; shift
  local dir="/tmp/engine-$name"
  rm -rf "$dir" && mkdir -p "$dir"
  step "study-$name" "$STUDY_LIMIT" $PY cli.py sweep --study-name "$name" --storage "sqlite:///$dir/optuna.db" \
    --tracking-uri "sqlite:///$dir/mlflow.db" --out "$dir" --schedule cosine --sampler ddpm,ddim --workers 1 \
    --quiet "${STUDY[@]}" "$@"
  cp "$dir/grid_search_results.json" "$OUT/study-$name.json" 2>>"$LOG"
}
study serial --overlap off --trials-per-worker 1
study engine --overlap on --trials-per-worker 2
$PY - "$OUT" <<'EOF' >>"$OUT/summary.txt" 2>&1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("bench-fused-off", "bench-fused-on"):
    p = out / f"{name}.json"
    if p.exists():
        r = json.loads(p.read_text())
        keys = ("train_images_per_s", "sample_image_steps_per_s", "sample_pass_fixed_s", "projected_reference_study_s",
                "fused_max_abs_diff", "train_concurrent_images_per_s", "fid_bf16_diff", "inception_images_per_s")
        print(name, {k: r.get(k) for k in keys})
import optuna  # the trials' own span: the command's time also holds the first run's caches (bench, FID reference)
for name in ("serial", "engine"):
    p = out / f"study-{name}.json"
    if p.exists():
        doc = json.loads(p.read_text())
        trials = optuna.load_study(study_name=name, storage=f"sqlite:////tmp/engine-{name}/optuna.db").get_trials()
        done = [t for t in trials if t.datetime_complete]
        span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds() if done else None
        print(name, "trials span", span, "s", [(r["params"]["sampler"], r["best_fid"]) for r in doc["results"]])
EOF
cat "$OUT/summary.txt"
