#!/usr/bin/env bash
# How much each backup adds to a deduplicating store (restic, or borg), for archives of a
# VM disk backed up twice with 1 % of its clusters changed in between (issue 18).
#
#   benches/dedup.sh [SIZE_MIB] [RUN_CLUSTERS] [KINDS]   (defaults: 2048 MiB, 1, all)
#   DEDUP_STORE=borg [BORG_CHUNKER=buzhash,12,18,14,4095] benches/dedup.sh ...
#
# DEDUP_STORE: restic (default; its chunks are 0.5-8 MiB, about 1 MiB on average, and
# cannot be made smaller) or borg with BORG_CHUNKER as its --chunker-params (default:
# 4 KiB to 256 KiB chunks, 16 KiB on average), "added" then being borg's deduplicated
# size of each archive (borg create --json, compression none).
#
# The image is random data (nothing compresses, nothing is zero, so every byte counts).
# Between the two backups, 1 % of its 64 KiB clusters change, chosen at random, in runs of
# RUN_CLUSTERS adjacent clusters (1: scattered single clusters). Each kind of archive gets a
# fresh restic repository; "added" is the growth of `restic stats --mode raw-data` (bytes
# of blobs stored, after restic's compression) over each backup. Kinds:
#   raw image          the image file itself: the floor for this store and this change
#   vzdump-style       random uuid, clusters shuffled differently each time, Proxmox's
#                      layout (benches' vma-shuffled), as a live backup writes them
#   vma create         today's default: random uuid, clusters in order (one disk)
#   reproducible       --reproducible, SOURCE_DATE_EPOCH fixed: the same derived uuid
#   reproducible-noint the same with --no-integrity (no CRC32C in the extent headers)
#   reproducible-zst   --reproducible --compress zstd: seekable .vma.zst, frames of at least
#                      2 MiB cut at extent boundaries (a changed cluster changes its frame)
#   uuid               --uuid-from: one uuid for the series, the ctime of each backup
#   reorder            the vzdump-style archive put through `vma reorder --uuid-from`
# KINDS: a space-separated list of these, `all` for every one (raw always comes first:
# the last column divides by its figure).
# Then it times `vma create` against `vma create --reproducible` on the first image.
#
# Needs restic or borg (installed here with apt-get when missing and run as root), python3 and
# /usr/bin/time; builds the release binaries. Files go under $BENCH_DIR (default: a fresh
# folder in /var/tmp), removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MIB=${1:-2048}
RUN=${2:-1}
KINDS=${3:-all}
[ "$KINDS" = all ] && KINDS="vzdump create reproducible reproducible-noint reproducible-zst uuid reorder"
KINDS="raw ${KINDS//raw/}"
STORE=${DEDUP_STORE:-restic}
BORG_CHUNKER=${BORG_CHUNKER:-buzhash,12,18,14,4095}
case $STORE in
  restic) tool=restic pkg=restic ;;
  borg) tool=borg pkg=borgbackup ;;
  *) echo "DEDUP_STORE must be restic or borg, not $STORE" >&2; exit 2 ;;
esac
if ! command -v "$tool" >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y -q "$pkg" >/dev/null
  else
    echo "missing $tool (apt-get install $pkg)" >&2
    exit 1
  fi
fi
case $STORE in
  restic) STORE_DESC="restic $(restic version | cut -d' ' -f2)" ;;
  borg) STORE_DESC="$(borg --version), --chunker-params $BORG_CHUNKER" ;;
esac
for t in python3 /usr/bin/time; do command -v "$t" >/dev/null || { echo "missing $t" >&2; exit 1; }; done
cargo build --release --locked -q -p vma-cli -p vma-benches
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
VMA=$TARGET/release/vma
SHUFFLED=$TARGET/release/vma-shuffled

DIR=${BENCH_DIR:-$(mktemp -d /var/tmp/vma-dedup.XXXXXX)}
mkdir -p "$DIR"
trap 'rm -rf "$DIR"' EXIT
export RESTIC_PASSWORD=dedup-bench RESTIC_CACHE_DIR=$DIR/cache
export BORG_BASE_DIR=$DIR/borg BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes

# --- the two images -----------------------------------------------------------------------
CHANGED=$(python3 - "$DIR" "$SIZE_MIB" "$RUN" <<'PY'
import os, random, sys
d, mib, run = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cluster = 65536
clusters = mib * 16
with open(os.path.join(d, "v1.raw"), "wb") as f:
    for _ in range(mib):
        f.write(os.urandom(1 << 20))
os.system(f"cp {d}/v1.raw {d}/v2.raw")
rng = random.Random(18)
want = clusters // 100
runs = sorted(rng.sample(range(clusters // run), want // run))
with open(os.path.join(d, "v2.raw"), "r+b") as f:
    for r in runs:
        f.seek(r * run * cluster)
        f.write(os.urandom(run * cluster))
print(len(runs) * run * cluster)
PY
)
sync

raw_data() { restic -r "$1" stats --mode raw-data --json -q | python3 -c 'import json,sys; print(json.load(sys.stdin)["total_size"])'; }

# init REPO: a new, empty repository.
init() {
  case $STORE in
    restic) restic -r "$1" init -q --repository-version 2 >/dev/null ;;
    borg) borg init -e none "$1" ;;
  esac
}

# backup REPO FILE: prints the bytes the backup added to the repository.
backup() {
  local before after
  case $STORE in
    restic)
      before=$(raw_data "$1")
      restic -r "$1" backup -q --force "$2" >/dev/null
      after=$(raw_data "$1")
      echo $((after - before)) ;;
    borg)
      borg create --json --compression none --chunker-params "$BORG_CHUNKER" \
        "$1::b$RANDOM$RANDOM" "$2" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["archive"]["stats"]["deduplicated_size"])' ;;
  esac
}

# make KIND IMAGE OUT: the archive of IMAGE as KIND makes it (raw: the image itself).
make_archive() {
  case $1 in
    raw) ln -f "$2" "$3" ;;
    vzdump) "$SHUFFLED" "$3" "$2" "$RANDOM$RANDOM" ;;
    create) "$VMA" create "$3" -d "format=raw:drive-scsi0=$2" ;;
    reproducible) SOURCE_DATE_EPOCH=1700000000 "$VMA" create --reproducible "$3" -d "format=raw:drive-scsi0=$2" ;;
    reproducible-noint) SOURCE_DATE_EPOCH=1700000000 "$VMA" create --reproducible --no-integrity "$3" -d "format=raw:drive-scsi0=$2" ;;
    reproducible-zst) SOURCE_DATE_EPOCH=1700000000 "$VMA" create --reproducible --compress zstd "$3" -d "format=raw:drive-scsi0=$2" ;;
    uuid) "$VMA" create --uuid-from vm-100 "$3" -d "format=raw:drive-scsi0=$2" ;;
    reorder)
      "$SHUFFLED" "$3.in" "$2" "$RANDOM$RANDOM"
      "$VMA" reorder --uuid-from vm-100 "$3.in" "$3"
      rm -f "$3.in" ;;
  esac
}

mib() { python3 -c "print(f'{$1 / 1048576:.1f}')"; }

echo "image: $SIZE_MIB MiB of random data; changed: $(mib "$CHANGED") MiB ($((CHANGED / 65536)) clusters in runs of $RUN); $STORE_DESC"
echo
echo "| archive | size (MiB) | 1st backup adds (MiB) | 2nd backup adds (MiB) | 2nd / changed bytes | 2nd / raw image's 2nd |"
echo "|---|---|---|---|---|---|"
declare -A LABEL=(
  [raw]="raw image (floor)"
  [vzdump]="vzdump-style (random uuid, shuffled)"
  [create]="\`vma create\` (random uuid, in order)"
  [reproducible]="\`vma create --reproducible\` (SOURCE_DATE_EPOCH fixed)"
  [reproducible-noint]="\`vma create --reproducible --no-integrity\`"
  [reproducible-zst]="\`vma create --reproducible --compress zstd\` (.vma.zst)"
  [uuid]="\`vma create --uuid-from vm-100\`"
  [reorder]="vzdump-style + \`vma reorder --uuid-from vm-100\`"
)
for kind in $KINDS; do
  repo=$DIR/repo-$kind
  init "$repo"
  mkdir -p "$DIR/$kind"
  make_archive "$kind" "$DIR/v1.raw" "$DIR/$kind/vzdump-qemu-100.vma"
  size=$(stat -c %s "$DIR/$kind/vzdump-qemu-100.vma")
  first=$(backup "$repo" "$DIR/$kind/vzdump-qemu-100.vma")
  rm -f "$DIR/$kind/vzdump-qemu-100.vma"
  make_archive "$kind" "$DIR/v2.raw" "$DIR/$kind/vzdump-qemu-100.vma"
  second=$(backup "$repo" "$DIR/$kind/vzdump-qemu-100.vma")
  rm -rf "$DIR/$kind" "$repo"
  [ "$kind" = raw ] && FLOOR=$second
  ratio=$(python3 -c "print(f'{$second / $CHANGED:.2f}')")
  floor=$(python3 -c "print(f'{$second / max($FLOOR, 1):.2f}')")
  echo "| ${LABEL[$kind]} | $(mib "$size") | $(mib "$first") | $(mib "$second") | $ratio | $floor |"
done

# --- what --reproducible costs: create times on the same input, interleaved ------------------
echo
echo "| \`vma create\` of v1.raw | run 1 (s) | run 2 (s) | run 3 (s) |"
echo "|---|---|---|---|"
declare -A TIMES
for i in 1 2 3; do
  for mode in default reproducible; do
    rm -f "$DIR/t.vma"
    sync
    flag=(); [ "$mode" = reproducible ] && flag=(--reproducible)
    t=$( { /usr/bin/time -f %e "$VMA" create "${flag[@]}" "$DIR/t.vma" -d "format=raw:drive-scsi0=$DIR/v1.raw" ; } 2>&1 >/dev/null | tail -n 1)
    TIMES[$mode]="${TIMES[$mode]:-}| $t "
  done
done
echo "| default ${TIMES[default]}|"
echo "| --reproducible ${TIMES[reproducible]}|"
