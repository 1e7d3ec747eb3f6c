#!/usr/bin/env bash
# Prepares the GPU check on this machine (the GPU machine compiles nothing): builds glimpse with
# the CUDA feature and writes a stripped copy to gpu-bin/glimpse (git-ignored). The release
# binary keeps line tables for backtraces, about 80 MB, more than the device tool carries
# (64 MiB with the working tree); stripped it is about 10 MB.
#
#   scripts/gpu-prepare.sh
#
# Then, with the device tool: run, carry ["gpu-bin"], command "scripts/gpu-check.sh gpu-bin/glimpse",
# timeout_s 420 (the check keeps to 6 minutes); copy its table into docs/gpu-results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --features cuda
mkdir -p gpu-bin
# (Where cargo put it: a CARGO_TARGET_DIR elsewhere leaves an older target/release/glimpse here.)
cp "${CARGO_TARGET_DIR:-target}/release/glimpse" gpu-bin/glimpse
strip gpu-bin/glimpse
# Which source the binary is: the check prints it in its table (a stale gpu-bin/ is easy to carry).
dirty=$([ -z "$(git status --porcelain --untracked-files=normal)" ] || echo '+uncommitted changes')
echo "$(git rev-parse --short=12 HEAD)$dirty built $(date -u '+%F %H:%M UTC')" >gpu-bin/COMMIT
ls -la gpu-bin/glimpse
gpu-bin/glimpse --version
cat gpu-bin/COMMIT
