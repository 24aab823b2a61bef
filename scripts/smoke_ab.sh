#!/usr/bin/env bash
# The smoke study in two source trees, back to back on this machine: wall seconds of each.
#   git worktree add /tmp/before 9b92241 && bash scripts/smoke_ab.sh /tmp/before .
# Each run gets its own SQLite stores, FID cache and bench cache (nothing shared between the two).
set -u
eval "$(python "$(dirname "$0")/../../shared/offline_assets.py")"
for tree in "$@"; do
  dir=$(mktemp -d)
  export MNIST_DIFF_BENCH_CACHE=$dir/bench MNIST_DIFF_FID_CACHE=$dir/fid-cache
  t0=$(date +%s.%N)
  (cd "$tree" && python cli.py sweep --preset smoke --study-name smoke --out "$dir/out" \
      --storage "sqlite:///$dir/optuna.db" --tracking-uri "sqlite:///$dir/mlflow.db" --quiet > "$dir/log.txt" 2>&1)
  rc=$?
  t1=$(date +%s.%N)
  echo "$tree ($(git -C "$tree" rev-parse --short HEAD)): rc=$rc, $(python -c "print(round($t1 - $t0, 1))") s; log in $dir"
done
