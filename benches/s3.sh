#!/usr/bin/env bash
# Archives in a bucket against the same archives in local files, in one run, on S3
# servers on loopback (benches/RESULTS.md, "Archives in a bucket"):
#   - speed rows on s3s-fs (crates.io; stores objects as files and serves ranges from
#     them): `vma create` into the bucket and into a file; the same archive put by curl
#     in one PUT (the server's own ceiling for taking those bytes, whatever the client);
#     `qemu-img convert` through `vma serve` of a seekable .vma.zst in the bucket and in
#     a file;
#   - the request count of `vma verify --quick` of a large archive on moto's server
#     (one log line per request).
# Interleaved, RUNS runs each; prints "name seconds" lines, the ratios, the count.
#
#   benches/s3.sh [SIZE_MIB] [RUNS] [QUICK_MIB]   (defaults: 1024, 3, 2048)
#
# Needs: scripts/install-deps (moto in .venv), qemu-img, curl; builds vma (release) and
# installs s3s-fs 0.14.1 (the last that builds on this Rust) into target/s3s-fs.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-1024}
RUNS=${2:-3}
QUICK=${3:-2048}
cargo build --release -q -p vma-cli
V=$PWD/target/release/vma
S3S=$PWD/target/s3s-fs/bin/s3s-fs
[ -x "$S3S" ] || cargo install -q --locked --root target/s3s-fs s3s-fs@0.14.1 --features binary
M=$(mktemp -d /var/tmp/vma-s3-bench.XXXXXX)
PORT=$((20000 + RANDOM % 20000))
FAST=$((PORT + 1))
.venv/bin/moto_server -H 127.0.0.1 -p "$PORT" > "$M/moto.log" 2>&1 &
MOTO=$!
mkdir -p "$M/s3s/bench"
"$S3S" --host 127.0.0.1 --port "$FAST" --access-key bench --secret-key bench "$M/s3s" \
  > "$M/s3s.log" 2>&1 &
S3SPID=$!
trap 'kill $MOTO $S3SPID 2>/dev/null; rm -rf "$M"' EXIT
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 HOME=$M
MOTO_URL=http://127.0.0.1:$PORT
export AWS_ENDPOINT_URL=http://127.0.0.1:$FAST
for i in $(seq 100); do curl -s -o /dev/null "$MOTO_URL" && break; sleep 0.1; done
for i in $(seq 100); do curl -s -o /dev/null "$AWS_ENDPOINT_URL" && break; sleep 0.1; done
curl -s -X PUT -o /dev/null "$MOTO_URL/bench"

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
put() { # file key: one signed PUT by curl (payload unsigned)
  curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user bench:bench \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -T "$1" -o /dev/null "$AWS_ENDPOINT_URL/bench/$2"
}
$V create "$M/conv.vma.zst" "drive-scsi0=$IMG"
$V create s3://bench/conv.vma.zst "drive-scsi0=$IMG"
for r in $(seq "$RUNS"); do
  rm -f "$M/c.vma" "$M/s3s/bench/c"*.vma "$M/s3s/bench/put"*
  sync
  t create-file $V create "$M/c.vma" "drive-scsi0=$IMG"
  t create-s3 $V create "s3://bench/c$r.vma" "drive-scsi0=$IMG"
  t put-s3 put "$M/c.vma" "put$r"
  t convert-file conv "$M/conv.vma.zst"
  t convert-s3 conv s3://bench/conv.vma.zst
done | tee "$M/times"
ls -l "$M/c.vma"
python3 - "$M/times" "$SIZE" <<'EOF'
import statistics, sys
t = {}
for line in open(sys.argv[1]):
    n, s = line.split()
    t.setdefault(n, []).append(float(s))
m = {n: statistics.median(v) for n, v in t.items()}
mib = int(sys.argv[2])
for n in ("create-file", "create-s3", "put-s3"):
    print(f"{n}: median {m[n]:.2f} s, {mib / m[n]:.0f} MiB/s of disk")
print(f"create: s3 throughput / file throughput = {m['create-file'] / m['create-s3']:.2f}")
print(f"create: s3 throughput / curl's one PUT of the finished archive = {m['put-s3'] / m['create-s3']:.2f}")
print(f"convert: s3 time / file time = {m['convert-s3'] / m['convert-file']:.2f} (median {m['convert-s3']:.2f} s vs {m['convert-file']:.2f} s)")
EOF

# verify --quick of a QUICK_MIB archive: requests counted in the server's log.
head -c "$((QUICK << 20))" /dev/urandom > "$M/big.raw"
AWS_ENDPOINT_URL=$MOTO_URL $V create s3://bench/big.vma "drive-scsi0=$M/big.raw"
rm -f "$M/big.raw"
before=$(grep -c '" [0-9][0-9][0-9] ' "$M/moto.log" || true)
AWS_ENDPOINT_URL=$MOTO_URL t verify-quick-s3 $V verify --quick s3://bench/big.vma
sleep 1  # werkzeug logs a request just after answering it
after=$(grep -c '" [0-9][0-9][0-9] ' "$M/moto.log" || true)
echo "verify --quick of a $QUICK MiB archive: $((after - before)) requests"
grep '" [0-9][0-9][0-9] ' "$M/moto.log" | tail -n "$((after - before))" | sed 's/^/  /'
