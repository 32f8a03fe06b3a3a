#!/usr/bin/env bash
# The engine benchmark: fio's nbd engine with the kbench job shapes (4k random read and
# write at queue depth 64, 128k sequential read and write at queue depth 64, 4k random write
# at queue depth 1), against nbdkit's file plugin (the reference NBD server) and the engine
# with 1, 2 and 3 file members, and with 1, 2 and 3 network members (replicas behind replica
# servers on loopback, the cluster data path), all on the same disk, side by side.
#
# Usage, from anywhere:  benches/engine.sh [SECONDS_PER_JOB]   (default 10)
# Environment: ENGINE_BENCH_SIZE (bytes per file, default 512 MiB; 11 files), ENGINE_BENCH_DIR (where
# the files and sockets go, default target/engine-bench).
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in fio nbdkit; do
  command -v "$tool" >/dev/null || {
    echo "$tool is missing: apt-get install -y fio nbdkit" >&2
    exit 1
  }
done

ENGINE_BENCH_RUNTIME="${1:-10}" cargo bench --bench engine
