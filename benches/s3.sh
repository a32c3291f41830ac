#!/usr/bin/env bash
# Archives in a bucket against the same archives in local files, in one run, on S3
# servers on loopback (benches/RESULTS.md, "Archives in a bucket"):
#   - speed rows on Garage (crates.io `garage`, a production S3 server; one node, blocks
#     on this disk, compression off): `vma create` into the bucket, into a file and into
#     a file with --sync; curl putting the finished archive in one PUT (what the server
#     takes with no archive work at all: its own ceiling for these bytes); `qemu-img
#     convert` through `vma serve` of a seekable .vma.zst in the bucket and in a file;
#     curl getting that object whole (the server's read ceiling);
#   - the request count of `vma verify --quick` of a large archive on moto's server
#     (it logs one line per request).
# Interleaved, RUNS runs each; prints "name seconds" lines, the ratios and the count.
#
#   benches/s3.sh [SIZE_MIB] [RUNS] [QUICK_MIB]   (defaults: 1024, 3, 2048)
#
# Needs: scripts/install-deps (moto in .venv), qemu-img, curl, xxd; builds vma (release)
# and, the first time, installs garage 2.5.0 into target/garage (8 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-1024}
RUNS=${2:-3}
QUICK=${3:-2048}
cargo build --release -q -p vma-cli
V=$PWD/target/release/vma
G=$PWD/target/garage/bin/garage
[ -x "$G" ] || cargo install -q --locked --root target/garage garage@2.5.0
M=$(mktemp -d /var/tmp/vma-s3-bench.XXXXXX)
PORT=$((20000 + RANDOM % 20000))
.venv/bin/moto_server -H 127.0.0.1 -p "$PORT" > "$M/moto.log" 2>&1 &
MOTO=$!
cat > "$M/garage.toml" <<CONFIG
metadata_dir = "$M/garage/meta"
data_dir = "$M/garage/data"
db_engine = "lmdb"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$((PORT + 2))"
rpc_public_addr = "127.0.0.1:$((PORT + 2))"
rpc_secret = "$(head -c 32 /dev/urandom | xxd -p -c 64)"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$((PORT + 1))"
root_domain = ".s3.garage.localhost"
CONFIG
g() { "$G" -c "$M/garage.toml" "$@"; }
g server > "$M/garage.log" 2>&1 &
GARAGE=$!
trap 'kill $MOTO $GARAGE 2>/dev/null; wait; rm -rf "$M"' EXIT
for i in $(seq 100); do g status > /dev/null 2>&1 && break; sleep 0.1; done
g layout assign -z dc1 -c 100G "$(g node id -q 2>/dev/null | cut -d@ -f1)" > /dev/null
g layout apply --version 1 > /dev/null
g bucket create bench > /dev/null
KEY=GK$(head -c 12 /dev/urandom | xxd -p -c 24)
SECRET=$(head -c 32 /dev/urandom | xxd -p -c 64)
g key import --yes -n bench "$KEY" "$SECRET" > /dev/null
g bucket allow --read --write --owner bench --key bench > /dev/null
export AWS_ACCESS_KEY_ID=$KEY AWS_SECRET_ACCESS_KEY=$SECRET AWS_REGION=garage HOME=$M
export AWS_ENDPOINT_URL=http://127.0.0.1:$((PORT + 1))
MOTO_URL=http://127.0.0.1:$PORT
for i in $(seq 100); do curl -s -o /dev/null "$MOTO_URL" && break; sleep 0.1; done
curl -s -X PUT -o /dev/null "$MOTO_URL/bench"
# moto takes any credentials: the same ones serve, with its endpoint and region.
moto() { AWS_ENDPOINT_URL=$MOTO_URL AWS_REGION=us-east-1 "$@"; }

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
signed_curl() { # one request by curl, signed (the payload unsigned, as S3 allows)
  curl -sf --aws-sigv4 "aws:amz:garage:s3" --user "$KEY:$SECRET" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -o /dev/null "$@"
}
put() { signed_curl -T "$1" "$AWS_ENDPOINT_URL/bench/$2"; } # FILE KEY
get() { signed_curl "$AWS_ENDPOINT_URL/bench/$1"; }         # KEY
$V create "$M/conv.vma.zst" "drive-scsi0=$IMG"
$V create s3://bench/conv.vma.zst "drive-scsi0=$IMG"
for r in $(seq "$RUNS"); do
  rm -f "$M/c.vma" "$M/cs.vma"
  sync
  t create-file $V create "$M/c.vma" "drive-scsi0=$IMG"
  t create-file-sync $V create --sync "$M/cs.vma" "drive-scsi0=$IMG"
  t create-s3 $V create "s3://bench/c$r.vma" "drive-scsi0=$IMG"
  t put-s3 put "$M/c.vma" "put$r"
  t convert-file conv "$M/conv.vma.zst"
  t convert-s3 conv s3://bench/conv.vma.zst
  t get-s3 get conv.vma.zst
done | tee "$M/times"
ls -l "$M/c.vma" "$M/conv.vma.zst"
python3 - "$M/times" "$SIZE" <<'EOF'
import statistics, sys
t = {}
for line in open(sys.argv[1]):
    n, s = line.split()
    t.setdefault(n, []).append(float(s))
m = {n: statistics.median(v) for n, v in t.items()}
mib = int(sys.argv[2])
for n in ("create-file", "create-file-sync", "create-s3", "put-s3"):
    print(f"{n}: median {m[n]:.2f} s, {mib / m[n]:.0f} MiB/s of disk")
r = lambda a, b: m[a] / m[b]
print(f"create: s3 throughput / file throughput = {r('create-file', 'create-s3'):.2f} "
      f"(/ file --sync: {r('create-file-sync', 'create-s3'):.2f})")
print(f"create: s3 throughput / curl's one PUT of the finished archive = {r('put-s3', 'create-s3'):.2f}")
print(f"create: curl's one PUT / vma create to a file = {r('create-file', 'put-s3'):.2f} "
      f"(/ file --sync: {r('create-file-sync', 'put-s3'):.2f}): the server's own ceiling")
print(f"convert: s3 time / file time = {r('convert-s3', 'convert-file'):.2f} "
      f"(median {m['convert-s3']:.2f} s vs {m['convert-file']:.2f} s; "
      f"curl GET of the object {m['get-s3']:.2f} s)")
EOF

# verify --quick of a QUICK_MIB archive: requests counted in the server's log.
head -c "$((QUICK << 20))" /dev/urandom > "$M/big.raw"
moto $V create s3://bench/big.vma "drive-scsi0=$M/big.raw"
rm -f "$M/big.raw"
before=$(grep -c '" [0-9][0-9][0-9] ' "$M/moto.log" || true)
moto t verify-quick-s3 $V verify --quick s3://bench/big.vma
sleep 1  # werkzeug logs a request just after answering it
after=$(grep -c '" [0-9][0-9][0-9] ' "$M/moto.log" || true)
echo "verify --quick of a $QUICK MiB archive: $((after - before)) requests"
grep '" [0-9][0-9][0-9] ' "$M/moto.log" | tail -n "$((after - before))" | sed 's/^/  /'
