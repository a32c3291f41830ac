#!/usr/bin/env bash
# Opening an archive with and without the extent index (SeekableArchive::open), on two
# sparse archives of one GIB GiB disk (default 256: 70 000 full data extents) that differ
# only in the index. Warm page cache (dropping it needs root); the reads each open makes
# are what it would cost in round trips from a bucket.
#
#   benches/open-index.sh [GIB] [RUNS]   (defaults: 256, 5)
#
# Files go under $BENCH_DIR (default: a fresh folder in /var/tmp), removed at the end;
# they take about 4 KiB of disk per data extent (280 MiB for 256 GiB).
set -euo pipefail
cd "$(dirname "$0")/.."

GIB=${1:-256}
RUNS=${2:-5}
DIR=${BENCH_DIR:-$(mktemp -d /var/tmp/vma-open-index.XXXXXX)}
trap 'rm -rf "$DIR"' EXIT

cargo build --release -q -p vma-benches --bin vma-open-index
target/release/vma-open-index "$DIR" "$GIB" "$RUNS"
du -sh --apparent-size "$DIR"/*.vma | sed 's/^/apparent: /'
du -sh "$DIR"/*.vma | sed 's/^/on disk:  /'
