#!/usr/bin/env bash
# run.sh of the GPU bundle (copied there by scripts/gpu-bundle.sh). On a GPU host:
#   ./run.sh            tests (GPU required), the GPU tests under compute-sanitizer
#                       memcheck/racecheck/initcheck/synccheck, `check`, `bench`
# A full run takes about ten minutes on an H100; STAGES splits it over several calls.
# Env: OUT (log folder, default ./out), STAGES (default: tests sanitizer check bench),
#      TESTS (test binaries to run, default: all), SANITIZER_TOOLS (default: all four),
#      SANITIZER_SUITES (GPU test binaries run under each tool, default: every GPU suite),
#      SANITIZER_CASES (proptest cases under the sanitizer, default 12), BENCH_GROUP (the
#      bench groups, e.g. "norm elementwise"; default: all), BENCH_JSON=0 / BENCH_TEXT=0
#      skip the JSON / text bench run, TORCH_OPS (groups of scripts/torch-ops-bench.py to time in PyTorch beside),
#      CRITERION=1 also runs the criterion benches, JIT_TIMING=1 times the first module load
#      without the driver JIT cache.
set -u
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
if [ -f payload.tar.xz ] && [ ! -d tests ]; then
  # xz(1) where it exists, else Python's lzma (every GPU host with PyTorch has Python).
  tar -xJf payload.tar.xz 2>/dev/null ||
    python3 -c 'import tarfile; tarfile.open("payload.tar.xz").extractall(".")' ||
    { echo "run.sh: cannot unpack payload.tar.xz" >&2; exit 1; }
fi
out=${OUT:-$here/out}
mkdir -p "$out"
export HYBRID_KERNELS_REQUIRE_GPU=1
export HYBRID_KERNELS_POISON=1   # every output allocation starts as NaN bytes
export HYBRID_KERNELS_BIN=$here/bin/hybrid-kernels  # for the CLI tests, built elsewhere
san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
summary=()
failed=0
note() { summary+=("$(printf '%-44s %s' "$1" "$2")"); }

stages=" ${STAGES:-tests sanitizer check bench} "
stage() { [[ "$stages" == *" $1 "* ]]; }

for name in ${TESTS:-$(ls tests)}; do
  stage tests || break
  t=tests/$name
  "$t" --test-threads=4 >"$out/test-$name.log" 2>&1
  rc=$?
  counts=$(grep -E '^test result:' "$out/test-$name.log" | tail -1 | sed 's/test result: //; s/; finished.*//')
  skipped=$(grep -c '^SKIPPED' "$out/test-$name.log")
  [ $rc = 0 ] || failed=1
  [ "$skipped" = 0 ] || failed=1
  note "test $name" "rc=$rc $counts; skipped: $skipped"
  # A failure's own words on stdout too: the log folder may not come back whole.
  if [ $rc != 0 ]; then
    echo "== test $name failed (rc=$rc); its failures:"
    sed -n '/^failures:/,$p' "$out/test-$name.log" | head -60
  fi
done

for tool in ${SANITIZER_TOOLS:-memcheck racecheck initcheck synccheck}; do
  stage sanitizer || break
  for name in ${SANITIZER_SUITES:-bspline_gpu kan_gpu spline_activation selective_scan_gpu causal_conv1d_gpu mlstm_gpu tensor norm elementwise embedding cross_entropy adamw}; do
    log="$out/sanitizer-$tool-$name.log"
    PROPTEST_CASES=${SANITIZER_CASES:-12} "$san" --tool "$tool" --error-exitcode 99 --print-limit 100 \
      "tests/$name" --test-threads=1 >"$log" 2>&1
    rc=$?
    verdict="rc=$rc $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)"
    if [ "$tool" = racecheck ] && [ $rc = 99 ]; then
      # cuBLAS's Hopper GEMM kernels (nvjet_*) synchronise through mbarriers, which racecheck
      # does not model, so it reports races inside them. Accept the run only if the tests
      # passed and every reported race is inside such a kernel. (Excluding them with
      # --kernel-name-exclude makes the instrumented run fail with illegal addresses.)
      ours=$(grep -E 'Race reported|hazard detected' "$log" | grep -vc nvjet)
      theirs=$(grep -E 'Race reported|hazard detected' "$log" | grep -c nvjet)
      if [ "$ours" = 0 ] && ! grep -q 'Target application returned an error' "$log"; then
        rc=0
        verdict="rc=0 (0 in our kernels; $theirs race reports inside cuBLAS nvjet kernels, a racecheck blind spot)"
      fi
    fi
    [ $rc = 0 ] || failed=1
    note "compute-sanitizer $tool $name" "$verdict"
  done
done

if [ "${JIT_TIMING:-0}" = 1 ]; then
  # Loading every module includes the driver's JIT of the PTX: timed without the JIT cache.
  start=$(date +%s.%N); CUDA_CACHE_DISABLE=1 bin/hybrid-kernels info >"$out/info-nocache.log" 2>&1; end=$(date +%s.%N)
  note "info without the JIT cache (s)" "$(awk "BEGIN { printf \"%.1f\", $end - $start }")"
fi
bin/hybrid-kernels info >"$out/info.log" 2>&1 || failed=1
cat "$out/info.log"
if stage check; then
  bin/hybrid-kernels check >"$out/check.log" 2>&1 || failed=1
  note "check" "$(grep -E '^check:' "$out/check.log")"
  cat "$out/check.log"
fi
if stage bench; then
  # Without the NaN fills of the test stages: they would be timed with every op. BENCH_GROUP
  # may name several groups; BENCH_JSON=0 skips the JSON run (the text table only).
  for g in ${BENCH_GROUP:-""}; do
    if [ "${BENCH_JSON:-1}" = 1 ]; then
      HYBRID_KERNELS_POISON=0 bin/hybrid-kernels bench $g --json >"$out/bench${g:+-$g}.json" 2>>"$out/bench-json.err" || failed=1
    fi
    if [ "${BENCH_TEXT:-1}" = 1 ]; then
      HYBRID_KERNELS_POISON=0 bin/hybrid-kernels bench $g >>"$out/bench.log" 2>&1 || failed=1
    fi
  done
  if [ "${CRITERION:-0}" = 1 ]; then
    for b in benches/*; do "$b" --bench >"$out/criterion-$(basename "$b").log" 2>&1 || failed=1; done
  fi
  cat "$out/bench.log" 2>/dev/null
fi
if [ -n "${TORCH_OPS:-}" ]; then
  # PyTorch (eager, torch.compile) at the same shapes, with the ratios against the JSON rows of
  # this run (TORCH_OPS: the groups, e.g. "norm elementwise").
  python3 - "$out" <<'PY' >"$out/bench-ours.json"
import glob, json, sys
rows = []
for f in sorted(glob.glob(sys.argv[1] + "/bench*.json")):
    try: rows += json.load(open(f))["rows"]
    except Exception: pass
print(json.dumps({"rows": rows}))
PY
  python3 ../scripts/torch-ops-bench.py $TORCH_OPS --ours "$out/bench-ours.json" --json "$out/torch-ops.json" \
    >"$out/torch-ops.log" 2>&1 || failed=1
  cat "$out/torch-ops.log"
fi

echo "== summary"
printf '%s\n' "${summary[@]}"
echo "bundle: $([ $failed = 0 ] && echo PASS || echo FAIL)"
exit $failed
