#!/usr/bin/env bash
# The recipe runs behind the learning targets (issue "Recipes ... that learn for real"), on one GPU.
# Usage: bash benchmarks/learning_runs.sh OUT_DIR   (MNIST from $EGGROLL_DATA_DIR)
# Each run writes OUT_DIR/<name>/{metrics.jsonl,summary.json,checkpoint.pt}; a line per run is printed.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs/learning}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
run() {  # name limit_s args...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s%N)
  timeout -k 5 "$limit" "$PY" -m eggroll_optim.recipes --no-progress --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc whole_process_ms=$((($(date +%s%N) - t0) / 1000000)) :: $*"
  tail -n 4 "$OUT/$name.log"
}
run cartpole_torch 120 --experiment cartpole --env-backend torch
run cartpole_gym 150 --experiment cartpole --env-backend gymnasium
run mlp_seed 120 --experiment mnist_mlp --eval-every 10
run mlp_adam 200 --experiment mnist_mlp   # the defaults (recipes.mnist.MLP: Adam, N=16384, B=512, 3600 steps)
run cnn_adam 200 --experiment mnist_cnn   # the defaults (recipes.mnist.CNN: Adam, N=2048, B=64, chunks of 128)
"$PY" - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for d in sorted(p for p in out.iterdir() if p.is_dir()):
    lines = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()] if (d / "metrics.jsonl").exists() else []
    acc = [(r["step"], r["time"], r["test_acc"]) for r in lines if "test_acc" in r]
    s = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
    first887 = next(((st, t) for st, t, a in acc if a >= 88.7), None)
    within120 = max((a for st, t, a in acc if t <= 120), default=None)
    print(d.name, {k: s.get(k) for k in ("status", "steps", "solved_at_step", "final_metric", "train_time_s", "warmup_s",
          "test_acc", "eval_returns", "peak_memory_gb")}, "best_acc", max((a for *_, a in acc), default=None),
          "first>=88.7 (step, s)", first887, "best within 120 s", within120)
PY
