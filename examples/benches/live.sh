#!/usr/bin/env bash
# Live backup cost: the same blockdev-backup of a fully written raw disk into (a) a plain
# raw file node, (b) vma-live-backup's NBD export and VMA archive; plus the latency a
# backup adds to a 64 KiB guest write into a not-yet-copied area.
# Usage: examples/benches/live.sh [SIZE_MIB]   (default 256; needs QEMU: scripts/install-deps)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo run --release --locked -q -p vma-examples --bin vma-live-backup -- --measure --size-mib "${1:-256}"
