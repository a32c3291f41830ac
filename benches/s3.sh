#!/usr/bin/env bash
# Archives in a bucket against the same archives in local files, in one run, on a moto
# server on loopback (benches/RESULTS.md, "Archives in a bucket"): `vma create` into the
# bucket and into a file, `qemu-img convert` through `vma serve` of a seekable .vma.zst in
# the bucket and in a file, and the requests `vma verify --quick` makes of a large
# archive in the bucket (counted in the server's log). Interleaved, RUNS runs each;
# prints "name seconds" lines, the ratios, and the request count.
#
#   benches/s3.sh [SIZE_MIB] [RUNS] [QUICK_MIB]   (defaults: 256, 3, 2048)
#
# Needs: scripts/install-deps (moto in .venv), qemu-img; builds vma (release).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-256}
RUNS=${2:-3}
QUICK=${3:-2048}
cargo build --release -q -p vma-cli
V=$PWD/target/release/vma
M=$(mktemp -d /var/tmp/vma-s3-bench.XXXXXX)
PORT=$((20000 + RANDOM % 20000))
.venv/bin/moto_server -H 127.0.0.1 -p "$PORT" > "$M/moto.log" 2>&1 &
MOTO=$!
trap 'kill $MOTO 2>/dev/null; rm -rf "$M"' EXIT
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT HOME=$M
for i in $(seq 100); do curl -s -o /dev/null "$AWS_ENDPOINT_URL" && break; sleep 0.1; done
curl -s -X PUT -o /dev/null "$AWS_ENDPOINT_URL/bench"

python3 benches/images.py "$M" "$SIZE" mixed
IMG=$M/mixed.raw
t() { local name=$1; shift; local s=$(date +%s.%N); "$@"; local e=$(date +%s.%N); echo "$name $(echo "$e - $s" | bc)"; }
conv() { # archive
  rm -f "$M/s.sock" "$M/out.raw"
  $V serve "$1" --socket "$M/s.sock" 2>/dev/null & local pid=$!
  for i in $(seq 200); do [ -S "$M/s.sock" ] && break; sleep 0.05; done
  qemu-img convert -f raw "nbd+unix:///drive-scsi0?socket=$M/s.sock" -O raw "$M/out.raw"
  kill -INT $pid; wait $pid
  cmp -s "$M/out.raw" "$IMG" || { echo "convert of $1 DIFFERS"; exit 1; }
}
$V create "$M/conv.vma.zst" "drive-scsi0=$IMG"
$V create s3://bench/conv.vma.zst "drive-scsi0=$IMG"
for r in $(seq "$RUNS"); do
  rm -f "$M/c.vma"
  t create-file $V create "$M/c.vma" "drive-scsi0=$IMG"
  t create-s3 $V create "s3://bench/c$r.vma" "drive-scsi0=$IMG"
  t convert-file conv "$M/conv.vma.zst"
  t convert-s3 conv s3://bench/conv.vma.zst
done | tee "$M/times"
python3 - "$M/times" <<'EOF'
import statistics, sys
t = {}
for line in open(sys.argv[1]):
    n, s = line.split()
    t.setdefault(n, []).append(float(s))
m = {n: statistics.median(v) for n, v in t.items()}
print(f"create: s3 throughput / file throughput = {m['create-file'] / m['create-s3']:.2f} (median {m['create-s3']:.2f} s vs {m['create-file']:.2f} s)")
print(f"convert: s3 time / file time = {m['convert-s3'] / m['convert-file']:.2f} (median {m['convert-s3']:.2f} s vs {m['convert-file']:.2f} s)")
EOF

# verify --quick of a QUICK_MIB archive: requests counted in the server's log.
head -c "$((QUICK << 20))" /dev/urandom > "$M/big.raw"
$V create s3://bench/big.vma "drive-scsi0=$M/big.raw"
rm -f "$M/big.raw"
before=$(grep -c '" [0-9][0-9][0-9] ' "$M/moto.log" || true)
t verify-quick-s3 $V verify --quick s3://bench/big.vma
sleep 1  # werkzeug logs a request just after answering it
after=$(grep -c '" [0-9][0-9][0-9] ' "$M/moto.log" || true)
echo "verify --quick of a $QUICK MiB archive: $((after - before)) requests"
grep '" [0-9][0-9][0-9] ' "$M/moto.log" | tail -n "$((after - before))" | sed 's/^/  /'
