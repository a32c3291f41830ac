#!/usr/bin/env bash
# Side-by-side performance of the `vma` command against the physical baselines, in one run
# on the same inputs. Prints a Markdown table of medians and ratios.
#
#   benches/compare.sh [SIZE_MIB] [RUNS]      (defaults: 2048 MiB, 3 runs)
#
# Needs: a release build (done here), zstd, /usr/bin/time, python3. Files go under
# $BENCH_DIR (default: a fresh folder in /var/tmp), removed at the end. The page cache is
# warm for every measurement (each input was just written), so these are CPU and memory
# costs, not disk speed: the baselines see the same cache.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MIB=${1:-2048}
RUNS=${2:-3}
cargo build --release --locked -q -p vma-cli -p vma-benches
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
VMA=$TARGET/release/vma
RANDREAD=$TARGET/release/vma-randread
for t in zstd python3 /usr/bin/time; do command -v "$t" >/dev/null || { echo "missing $t (run scripts/install-deps)" >&2; exit 1; }; done

DIR=${BENCH_DIR:-$(mktemp -d /var/tmp/vma-bench.XXXXXX)}
mkdir -p "$DIR"
trap 'rm -rf "$DIR"' EXIT

# --- inputs -------------------------------------------------------------------------------
python3 - "$DIR" "$SIZE_MIB" <<'PY'
import os, sys
d, mib = sys.argv[1], int(sys.argv[2])
one = 1 << 20
rnd = os.urandom(one * 8)
def chunk(i):
    off = (i * 7919 % 8) * one
    return rnd[off:off + one]
with open(os.path.join(d, "mixed.raw"), "wb") as f:      # 1 MiB runs: random, zero, ...
    for i in range(mib):
        f.write(chunk(i) if i % 2 == 0 else bytes(one))
with open(os.path.join(d, "zero90.raw"), "wb") as f:     # 90 % zero
    for i in range(mib):
        f.write(chunk(i) if i % 10 == 0 else bytes(one))
with open(os.path.join(d, "sparse.raw"), "wb") as f:     # sparse: holes with 1 MiB of data every 64 MiB
    f.truncate(mib * one)
    for i in range(0, mib, 64):
        f.seek(i * one); f.write(chunk(i))
PY
sync

median() { python3 -c 'import sys,statistics; print("%.3f" % statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
# time_cmd NAME CMD...: runs CMD $RUNS times (with a cleanup between) and records the median
declare -A T
rss_rows=()
time_it() {
  local name=$1; shift
  local xs=()
  for _ in $(seq "$RUNS"); do
    rm -rf "$DIR/out" "$DIR/out.vma" "$DIR/out.raw"
    local s e
    s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N)
    xs+=("$(python3 -c "print($e-$s)")")
  done
  T[$name]=$(median "${xs[@]}")
}
peak_rss() { # KiB
  /usr/bin/time -f %M "$@" 2>&1 >/dev/null | tail -n1
}

rows=()
row() { rows+=("| $1 | $2 | $3 | $(python3 -c "print('%.2f' % ($2/$3))") |"); }

for img in mixed zero90 sparse; do
  IMG=$DIR/$img.raw
  A=$DIR/$img.vma
  rm -f "$A"; "$VMA" create "$A" -d "format=raw:drive-scsi0=$IMG"
  zstd -q -f -T1 "$A" -o "$A.zst"

  time_it "cp-in-$img" cp --sparse=always "$IMG" "$DIR/out.raw"
  time_it "create-$img" "$VMA" create "$DIR/out.vma" -d "format=raw:drive-scsi0=$IMG"
  row "create $img" "${T[create-$img]}" "${T[cp-in-$img]}"

  time_it "extract-$img" "$VMA" extract "$A" "$DIR/out"
  row "extract $img" "${T[extract-$img]}" "${T[cp-in-$img]}"

  time_it "cat-$img" sh -c "cat '$A' > /dev/null"
  time_it "verify-stdin-$img" sh -c "'$VMA' verify - < '$A'"
  row "verify (stream, stdin) $img" "${T[verify-stdin-$img]}" "${T[cat-$img]}"
  time_it "verify-quick-$img" "$VMA" verify --quick "$A"
  row "verify --quick (file, headers only) $img" "${T[verify-quick-$img]}" "${T[cat-$img]}"

  time_it "zstd-$img" sh -c "zstd -q -dc '$A.zst' > /dev/null"
  time_it "extract-zst-$img" "$VMA" extract "$A.zst" "$DIR/out"
  row "extract .vma.zst $img" "${T[extract-zst-$img]}" "${T[zstd-$img]}"

  rss_create=$(rm -f "$DIR/out.vma"; peak_rss "$VMA" create "$DIR/out.vma" -d "format=raw:drive-scsi0=$IMG")
  rss_extract=$(rm -rf "$DIR/out"; peak_rss "$VMA" extract "$A" "$DIR/out")
  rss_verify=$(peak_rss sh -c "'$VMA' verify - < '$A'")
  rss_rows+=("| $img | $((rss_create / 1024)) | $((rss_extract / 1024)) | $((rss_verify / 1024)) |")
done

# Seekable random 4 KiB reads through the archive index against pread on the raw image.
A=$DIR/mixed.vma
rr=$("$RANDREAD" "$A" "$DIR/mixed.raw" 200000)

echo
echo "## vma vs baselines: ${SIZE_MIB} MiB images, median of $RUNS runs"
echo
echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB RAM, $(df -h "$DIR" | awk 'NR==2 {print $1}') ($(uname -r))"
echo
echo "| measurement | vma (s) | baseline (s) | ratio |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "Baselines: create and extract against \`cp --sparse=always\` of the raw image; verify against"
echo "\`cat archive > /dev/null\`; compressed extract against \`zstd -dc\` to /dev/null."
echo
echo "| image | peak RSS create (MiB) | extract (MiB) | verify stdin (MiB) |"
echo "|---|---|---|---|"
printf '%s\n' "${rss_rows[@]}"
echo
echo "$rr"
