#!/usr/bin/env bash
# What a backup does to a real guest's writes, measured from inside the guest: a Linux
# guest (scripts/build-guest) times 4 KiB O_DIRECT writes at random offsets of a fully
# written data disk, one every 2 ms, through phases back to back: no backup; QEMU's
# blockdev-backup into a raw file; blockdev-backup into a raw file on tmpfs (a target that
# costs only a memory copy) with QEMU's x-perf, with 4 x 1 MiB, and with 4 x 1 MiB at 0.9 x
# the raw file's throughput (the job's speed); no backup while the host reads the disk's
# image at that rate; vma-live-backup with QEMU's own copy-before-write filter, then with
# ours and x-perf QEMU's, 4 x 1 MiB without and with the push buffer, at nice 0 and at the
# default nice 10, 2 x 256 KiB, 1 x 64 KiB, then limited to 50 MiB/s (--bwlimit) without
# and with the push buffer; no backup again. Prints p50/p99/max per phase, and for the
# writes made while a copy ran, split into those to clusters it had not reached
# (copy-before-write) and those to clusters already copied (figures, not asserts; under
# TCG, so absolute times are the emulator's).
# ROUNDS backups per setting, their writes pooled.
# Usage: examples/benches/live-guest.sh [SIZE_MIB [ROUNDS]]   (default 256 1; needs QEMU:
# scripts/install-deps)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo run --release --locked -q -p vma-examples --bin vma-live-backup -- --measure-guest --size-mib "${1:-256}" --rounds "${2:-1}"
