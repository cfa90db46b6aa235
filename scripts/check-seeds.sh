#!/usr/bin/env bash
# Runs `hybrid-kernels check --device cpu` for seeds 1..N (default 1000) and fails on the first
# seed that reports a FAIL or an error, printing its table. A correct build never does: on the
# CPU only the rounding of each output is measured, and every tolerance is at least two
# roundings (src/measure.rs). About 1.4 s a seed on one core; JOBS (default 2) run at once.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
n=${1:-1000}
jobs=${JOBS:-2}
cargo build --release --quiet
bin=target/release/hybrid-kernels
export bin
seq 1 "$n" | xargs -P "$jobs" -I{} sh -c '
  out=$("$bin" check --device cpu --seed {} 2>&1) && ! printf "%s\n" "$out" | grep -q FAIL ||
    { printf "seed {}:\n%s\n" "$out"; exit 255; }'
echo "check --device cpu: seeds 1..$n all pass"
