#!/usr/bin/env bash
# Builds the fuzz targets and runs each one for a while on its corpus; any crash, panic, hang
# (over 10 s for one input) or allocation over 2 GB fails the run.
#
#   fuzz/run.sh [seconds per target, default 20] [target ...]
#
# The build uses the coverage flags cargo-fuzz passes to rustc (`cargo fuzz build`), with debug
# assertions and overflow checks on and without the address sanitizer, so it needs neither
# cargo-fuzz nor a nightly toolchain and builds in a few minutes on two cores. `cargo fuzz run
# <target>` works as well where cargo-fuzz is installed (RUSTC_BOOTSTRAP=1 on stable).
set -euo pipefail
cd "$(dirname "$0")"
per_target="${1:-20}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf safetensors config chat_template gguf_tokenizer)

host="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"
# --target keeps these flags off build scripts and proc macros.
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
  cargo build --release --target "$host" --bins

bin="$CARGO_TARGET_DIR/$host/release"
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  echo "== $t: ${per_target}s"
  # Runs go to a scratch copy of the corpus: what a short run finds is not committed.
  work="$(mktemp -d)"
  cp "corpus/$t"/* "$work"/
  if ! "$bin/$t" "$work" "corpus/$t" -max_total_time="$per_target" -rss_limit_mb=2048 \
      -malloc_limit_mb=2048 -timeout=10 -artifact_prefix="artifacts/$t/" -print_final_stats=1 \
      2>"artifacts/$t.log"; then
    status=1
    tail -n 40 "artifacts/$t.log"
  fi
  grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb)" "artifacts/$t.log" || true
  rm -rf "$work"
done
exit $status
