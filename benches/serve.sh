#!/usr/bin/env bash
# `vma serve` throughput: `qemu-img convert` of a device from the NBD export to a raw file,
# against `vma extract` of the same archive. Same input, same run, medians.
#
#   benches/serve.sh [SIZE_MIB] [RUNS]      (defaults: 1024 MiB, 3 runs)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
RUNS=${2:-3}
cargo build --release --locked -q -p vma-cli
VMA=$PWD/target/release/vma
for t in qemu-img python3; do command -v "$t" >/dev/null || { echo "missing $t (run scripts/install-deps)" >&2; exit 1; }; done
DIR=$(mktemp -d /var/tmp/vma-serve-bench.XXXXXX)
SERVER=
cleanup() { [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT

python3 benches/images.py "$DIR" "$SIZE_MIB" mixed
mv "$DIR/mixed.raw" "$DIR/disk.raw"
"$VMA" create "$DIR/a.vma" -d "format=raw:drive-scsi0=$DIR/disk.raw"
"$VMA" serve "$DIR/a.vma" --socket "$DIR/s.sock" 2>/dev/null & SERVER=$!
while [ ! -S "$DIR/s.sock" ]; do sleep 0.05; done

median() { python3 -c 'import sys,statistics; print("%.3f" % statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
run() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); python3 -c "print($e-$s)"; }
ex=(); nbd=()
for _ in $(seq "$RUNS"); do
  rm -rf "$DIR/x" "$DIR/out.raw"
  ex+=("$(run "$VMA" extract "$DIR/a.vma" "$DIR/x")")
  rm -rf "$DIR/x"
  nbd+=("$(run qemu-img convert -f raw "nbd+unix:///drive-scsi0?socket=$DIR/s.sock" -O raw "$DIR/out.raw")")
  cmp -s "$DIR/out.raw" "$DIR/disk.raw" || { echo "convert output differs from the image" >&2; exit 1; }
done
E=$(median "${ex[@]}"); N=$(median "${nbd[@]}")
echo "| qemu-img convert from vma serve ($SIZE_MIB MiB mixed) | $N s | vma extract $E s | ratio $(python3 -c "print('%.2f' % ($N/$E))") |"
