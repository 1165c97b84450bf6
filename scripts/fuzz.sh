#!/usr/bin/env bash
# Builds every libFuzzer target (tests/fuzz/fuzz_*.c) with clang-14, ASan and
# UBSan into build-fuzz/ and fuzzes each for a bounded time, two at a time,
# starting from its seed corpus (tests/fuzz/corpus/<target>, never written to).
# Fails if any target crashes, leaks, hangs (one input over 10 s), runs out of
# memory or trips a sanitizer; the input that did it is kept in
# build-fuzz/fuzz/artifacts/ and the target's log in build-fuzz/fuzz/logs/
# (both until the next run).
# Reproduce with: build-fuzz/tests/<target> <artifact>
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default: $PC_FUZZ_SECONDS, else 40)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${1:-${PC_FUZZ_SECONDS:-40}}
[[ $secs =~ ^[1-9][0-9]*$ ]] || { echo "fuzz.sh: seconds must be a positive integer" >&2; exit 2; }
parallel=2
dir=build-fuzz
out=$dir/fuzz

targets=()
for src in tests/fuzz/fuzz_*.c; do
  targets+=("$(basename "$src" .c)")
done

cmake -S . -B "$dir" -DCMAKE_C_COMPILER=clang-14 -DBUILD_TESTING=ON -DPC_WERROR=ON -DPC_FUZZ=ON \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$dir" -j"$parallel" --target "${targets[@]}"

rm -rf "$out"
mkdir -p "$out/logs" "$out/artifacts" "$out/status"
# A UBSan report is fatal already (-fno-sanitize-recover); leaks are checked
# after every input by libFuzzer itself.
export ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

fuzz_one() { # $1 = target; records its exit status in $out/status/<target>
  local t=$1 rc=0
  mkdir -p "$out/corpus/$t"
  "$dir/tests/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$out/artifacts/$t-" "$out/corpus/$t" "tests/fuzz/corpus/$t" \
    >"$out/logs/$t.log" 2>&1 || rc=$?
  echo "$rc" >"$out/status/$t"
}

echo "fuzz.sh: ${#targets[@]} targets, ${secs} s each, $parallel at a time"
for t in "${targets[@]}"; do
  while (($(jobs -rp | wc -l) >= parallel)); do wait -n || true; done
  fuzz_one "$t" &
done
wait

failed=()
for t in "${targets[@]}"; do
  rc=$(cat "$out/status/$t" 2>/dev/null || echo missing)
  runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$out/logs/$t.log")
  units=$(sed -n 's/^stat::new_units_added: *//p' "$out/logs/$t.log")
  printf '  %-12s exit %-3s %10s runs, %s new inputs\n' "$t" "$rc" "${runs:-?}" "${units:-?}"
  # A clean run ends with "Done N runs": anything else did not fuzz.
  if [[ $rc != 0 || -z $runs ]]; then failed+=("$t"); fi
done
if ((${#failed[@]})); then
  for t in "${failed[@]}"; do
    echo "== $t: last lines of $out/logs/$t.log ==" >&2
    tail -n 60 "$out/logs/$t.log" >&2
  done
  echo "fuzz.sh: FAILED: ${failed[*]} (inputs in $out/artifacts/)" >&2
  exit 1
fi
echo "fuzz.sh: every target ran ${secs} s without a finding"
