#!/usr/bin/env bash
# Run the four benchmarks at full size (GPU) and write their JSON and logs to $1 (default benchmarks/out).
# Each runs under `timeout`; a failure is recorded and the next one still runs. Worst case (every
# script hitting its limit) 80+110+110+150 s = 7.5 min; expected well under that on one H100.
#   PYTHON=python3 (default; the device image's python3 holds torch)   BENCH_ARGS="..." appended to every call
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-benchmarks/out}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
read -r -a EXTRA <<< "${BENCH_ARGS:-}"
STATUS=()
run() {  # name limit_s args...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  timeout -k 5 "$limit" "$PY" "benchmarks/$name.py" --out "$OUT_DIR/$name.json" "$@" "${EXTRA[@]}" \
    > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || tail -n 15 "$OUT_DIR/$name.log"
  STATUS+=("$name rc=$rc $((SECONDS - t0))s")
}
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
  torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>&1 | tee "$OUT_DIR/env.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> "$OUT_DIR/env.txt" 2>&1 || true
run bench_microbench 80
run bench_mnist_step 110
run bench_cartpole 110
run bench_population 150
echo "=== tables"
for name in bench_microbench bench_mnist_step bench_cartpole bench_population; do
  [ -f "$OUT_DIR/$name.log" ] && { echo "--- $name"; awk '/^# (ceilings|correctness)/{p=1} p' "$OUT_DIR/$name.log" | cut -c1-220; }
done
echo "=== status"; printf '%s\n' "${STATUS[@]}"
