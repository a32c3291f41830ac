#!/bin/bash
# A stock .vma.zst (as vzdump compresses: cat X | zstd --rsyncable -T1 -3) through `vma
# index`'s sidecar, against the plain archive and our seekable .vma.zst of the same image
# (benches/RESULTS.md, "Stock .vma.zst through a sidecar index"). Interleaved, 3 runs
# each; prints "name seconds" lines and vma-randread's lines.
#   benches/stock-zstd.sh DIR   (DIR holds img.raw, arch.vma = vma create of it,
#                                pipe1.vma.zst = cat arch.vma | zstd -q --rsyncable -T1 -3,
#                                ours.vma.zst = vma create ours.vma.zst of img.raw)
# Needs: cargo build --release -p vma-cli -p vma-benches; qemu-img; zstd.
cd "$(dirname "$0")/.."
V=$PWD/target/release/vma
RR=$PWD/target/release/vma-randread
D=${1:?usage: benches/stock-zstd.sh DIR}
M=$(mktemp -d)
trap 'rm -rf "$M"' EXIT
t() { local name=$1; shift; local s=$(date +%s.%N); "$@"; local e=$(date +%s.%N); echo "$name $(echo "$e - $s" | bc)"; }
conv() { # archive extra...
  local a=$1; shift
  rm -f $M/s.sock $M/out.raw
  $V serve "$a" --socket $M/s.sock "$@" & local pid=$!
  for i in $(seq 100); do [ -S $M/s.sock ] && break; sleep 0.05; done
  qemu-img convert -f raw "nbd+unix:///drive-scsi0?socket=$M/s.sock" -O raw $M/out.raw
  kill -INT $pid; wait $pid
}
for i in 1 2 3; do
  t zstd-d sh -c "zstd -q -d -c $D/pipe1.vma.zst > /dev/null"
  t index sh -c "$V index --force $D/pipe1.vma.zst -o $M/pipe1.idx > /dev/null"
  t cat-indexed sh -c "$V cat --index $M/pipe1.idx $D/pipe1.vma.zst drive-scsi0 > /dev/null"
  t cat-plain sh -c "$V cat $D/arch.vma drive-scsi0 > /dev/null"
  t cat-ours sh -c "$V cat $D/ours.vma.zst drive-scsi0 > /dev/null"
  t convert-indexed conv $D/pipe1.vma.zst --index $M/pipe1.idx
  cmp -s $M/out.raw $D/img.raw && echo "convert-indexed byte-exact" || echo "convert-indexed DIFFERS"
  t convert-plain conv $D/arch.vma
  t convert-ours conv $D/ours.vma.zst
  $RR $D/pipe1.vma.zst $D/img.raw 1000 $M/pipe1.idx | sed 's/^/rr-indexed /'
  $RR $D/ours.vma.zst $D/img.raw 1000 | sed 's/^/rr-ours /'
  $RR $D/arch.vma $D/img.raw 200000 | sed 's/^/rr-plain /'
done
