#!/usr/bin/env bash
# Builds the fuzz targets and runs each for a bounded time; exits non-zero if any crashed,
# hung or ran out of memory (the input is left in fuzz/artifacts/<target>/).
#
#   fuzz/run.sh [SECONDS] [TARGET...]     default: 60 seconds each, every target
#
# Coverage-guided on the stable toolchain, without cargo-fuzz or nightly: libfuzzer-sys builds
# libFuzzer (C++) and links its main, and rustc's stable -Cpasses=sancov-module with
# SanitizerCoverage's LLVM options instruments our code (inline 8-bit counters, PC table,
# comparison tracing) the way `cargo fuzz --sanitizer none` does. No AddressSanitizer, which
# needs -Zsanitizer: safe Rust does not need it for what we look for (panics, hangs, OOM).
#
# New inputs go to fuzz/target/corpus/<target>/ (kept between runs, not committed); the seeds
# in fuzz/corpus/<target>/ are only read. A crash input belongs in fuzz/regressions/<target>/,
# which the main crate's tests/fuzz_regressions.rs replays. A target with a dict/<target>.dict
# gets it as libFuzzer's -dict: tokens (XML names, say) that byte mutations would rarely spell.
set -euo pipefail

secs=${1:-60}
shift || true
cd "$(dirname "$0")"
all=(virtio_request virtio_queue qmp pdata_blocks pdata_image xml_restore vhost_user nbd nbd_client)
targets=("${@:-${all[@]}}")

if ! command -v c++ >/dev/null; then
    echo "run.sh: libFuzzer needs a C++ compiler; installing g++" >&2
    apt-get update -qq && apt-get install -y -qq g++ >/dev/null
fi

triple=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="$PWD/target"
# --target keeps these flags off build scripts and proc macros.
export RUSTFLAGS="${RUSTFLAGS:-} --cfg fuzzing -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cdebug-assertions -Coverflow-checks"
start=$(date +%s)
cargo build --locked --release --target "$triple" --bins
echo "run.sh: built in $(( $(date +%s) - start )) s"

failed=()
for t in "${targets[@]}"; do
    bin="$CARGO_TARGET_DIR/$triple/release/$t"
    [ -x "$bin" ] || { echo "run.sh: no target $t (have: ${all[*]})" >&2; exit 2; }
    mkdir -p "target/corpus/$t" "artifacts/$t"
    log="target/$t.log"
    opts=()
    [ -f "dict/$t.dict" ] && opts+=(-dict="dict/$t.dict")
    rc=0
    "$bin" "target/corpus/$t" "corpus/$t" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" "${opts[@]}" >"$log" 2>&1 || rc=$?
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    cov=$(echo "$last" | grep -o 'cov: [0-9]*' || true)
    ft=$(echo "$last" | grep -o 'ft: [0-9]*' || true)
    corp=$(echo "$last" | grep -o 'corp: [0-9]*/[0-9a-zA-Z]*' || true)
    printf '%-15s rc=%-3s execs=%-9s exec/s=%-7s %s %s %s\n' \
        "$t" "$rc" "${execs:-?}" "${rate:-?}" "$cov" "$ft" "$corp"
    if [ "$rc" -ne 0 ]; then
        failed+=("$t")
        grep -E 'panicked|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | head -5 | sed 's/^/    /'
        # A hang between threads: what each was doing (fuzz/src/stall_report.rs).
        grep -E '^STALL' "$log" | head -40 | sed 's/^/    /' || true
    fi
done

echo "run.sh: total $(( $(date +%s) - start )) s"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "run.sh: FAILED: ${failed[*]} (logs in fuzz/target/<target>.log, inputs in fuzz/artifacts/)" >&2
    exit 1
fi
