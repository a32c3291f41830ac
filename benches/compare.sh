#!/usr/bin/env bash
# Side-by-side performance of the `vma` command against the physical baselines, in one run
# on the same inputs. Prints a Markdown table of medians and ratios.
#
#   benches/compare.sh [SIZE_MIB] [RUNS] [SECTIONS]  (defaults: 2048 MiB, 3 runs, all)
#
# SECTIONS: `all`, `raw` (raw images and archives only), `qemu` (the QEMU image formats
# through qemu-storage-daemon, on the mixed image only) or `zst` (seekable zstd: create
# X.vma.zst against `zstd -T0` on the plain archive, extract and serve of it against the
# plain archive's, on a compressible image: a tar of /usr filling half of it, then zeros).
#
# Needs: a release build (done here), zstd, /usr/bin/time, python3; for `qemu`, qemu-img
# and qemu-storage-daemon. Files go under
# $BENCH_DIR (default: a fresh folder in /var/tmp), removed at the end. The page cache is
# warm for every measurement (each input was just written), so these are CPU and memory
# costs, not disk speed: the baselines see the same cache.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MIB=${1:-2048}
RUNS=${2:-3}
SECTIONS=${3:-all}
want() { [ "$SECTIONS" = all ] || [ "$SECTIONS" = "$1" ]; }
cargo build --release --locked -q -p vma-cli -p vma-benches
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
VMA=$TARGET/release/vma
RANDREAD=$TARGET/release/vma-randread
for t in zstd python3 /usr/bin/time; do command -v "$t" >/dev/null || { echo "missing $t (run scripts/install-deps)" >&2; exit 1; }; done
if want qemu; then
  for t in qemu-img qemu-storage-daemon; do command -v "$t" >/dev/null || { echo "missing $t (run scripts/install-deps)" >&2; exit 1; }; done
fi

DIR=${BENCH_DIR:-$(mktemp -d /var/tmp/vma-bench.XXXXXX)}
mkdir -p "$DIR"
trap 'rm -rf "$DIR"' EXIT

# --- inputs -------------------------------------------------------------------------------
python3 benches/images.py "$DIR" "$SIZE_MIB"
sync

# timings NAME CMD [NAME CMD ...]: medians of $RUNS interleaved rounds (benches/timeit.py),
# with the previous run's output removed and the page cache's dirty pages written back
# (sync) before each command, so that no run pays for an earlier run's writeback;
# stored in T[NAME].
declare -A T
rss_rows=()
timings() {
  local name secs
  while read -r name secs; do T[$name]=$secs; done < <(
    python3 benches/timeit.py "$RUNS" --before "rm -rf '$DIR/out' '$DIR/out.vma' '$DIR/out.raw' '$DIR/out.qcow2'; sync" "$@")
}
peak_rss() { # KiB
  /usr/bin/time -f %M "$@" 2>&1 >/dev/null | tail -n1
}

rows=()
row() { rows+=("| $1 | $2 | $3 | $(python3 -c "print('%.2f' % ($2/$3))") |"); }

images=(mixed zero90 sparse)
want raw || images=()
for img in "${images[@]}"; do
  IMG=$DIR/$img.raw
  A=$DIR/$img.vma
  P=$DIR/$img.plain.vma
  rm -f "$A" "$P"
  "$VMA" create "$A" -d "format=raw:drive-scsi0=$IMG"
  "$VMA" create --no-integrity "$P" -d "format=raw:drive-scsi0=$IMG"
  zstd -q -f -T1 "$A" -o "$A.zst"

  timings \
    "cp-$img" "cp --sparse=always '$IMG' '$DIR/out.raw'" \
    "create-$img" "'$VMA' create '$DIR/out.vma' -d 'format=raw:drive-scsi0=$IMG'" \
    "create-plain-$img" "'$VMA' create --no-integrity '$DIR/out.vma' -d 'format=raw:drive-scsi0=$IMG'" \
    "extract-$img" "'$VMA' extract '$A' '$DIR/out'"
  row "create $img" "${T[create-$img]}" "${T[cp-$img]}"
  row "create --no-integrity $img" "${T[create-plain-$img]}" "${T[cp-$img]}"
  row "extract $img" "${T[extract-$img]}" "${T[cp-$img]}"

  timings \
    "cat-$img" "cat '$A' > /dev/null" \
    "verify-stdin-$img" "'$VMA' verify - < '$A'" \
    "pipe-$img" "cat '$A' | cat > /dev/null" \
    "verify-pipe-$img" "cat '$A' | '$VMA' verify -" \
    "verify-quick-$img" "'$VMA' verify --quick '$A'" \
    "cat-plain-$img" "cat '$P' > /dev/null" \
    "verify-plain-$img" "'$VMA' verify - < '$P'"
  row "verify (stream, stdin) $img" "${T[verify-stdin-$img]}" "${T[cat-$img]}"
  row "verify (stream, through a pipe; baseline: cat piped to cat) $img" "${T[verify-pipe-$img]}" "${T[pipe-$img]}"
  row "verify --quick (file, headers only) $img" "${T[verify-quick-$img]}" "${T[cat-$img]}"
  row "verify (stream) of a --no-integrity archive $img" "${T[verify-plain-$img]}" "${T[cat-plain-$img]}"

  timings \
    "zstd-$img" "zstd -q -dc '$A.zst' > /dev/null" \
    "extract-zst-$img" "'$VMA' extract '$A.zst' '$DIR/out'" \
    "extract-again-$img" "'$VMA' extract '$A' '$DIR/out'"
  row "extract .vma.zst $img" "${T[extract-zst-$img]}" "${T[zstd-$img]}"
  row "extract .vma.zst vs plain extract $img" "${T[extract-zst-$img]}" "${T[extract-again-$img]}"

  rss_create=$(rm -f "$DIR/out.vma"; peak_rss "$VMA" create "$DIR/out.vma" -d "format=raw:drive-scsi0=$IMG")
  rss_extract=$(rm -rf "$DIR/out"; peak_rss "$VMA" extract "$A" "$DIR/out")
  rss_verify=$(peak_rss sh -c "'$VMA' verify - < '$A'")
  rss_rows+=("| $img | $((rss_create / 1024)) | $((rss_extract / 1024)) | $((rss_verify / 1024)) |")
done

# Seekable random 4 KiB reads through the archive index against pread on the raw image.
A=$DIR/mixed.vma
rr=
want raw && rr=$("$RANDREAD" "$A" "$DIR/mixed.raw" 200000)

# --- QEMU image formats through qemu-storage-daemon, on the mixed image ------------------
if want qemu; then
  IMG=$DIR/mixed.raw
  [ -f "$A" ] || "$VMA" create "$A" -d "format=raw:drive-scsi0=$IMG"
  Q=$DIR/mixed.qcow2
  qemu-img convert -f raw -O qcow2 "$IMG" "$Q"
  SIZE=$(stat -c %s "$IMG")
  TQ=$DIR/target.qcow2
  printf 'format=qcow2:0:drive-scsi0=%s\ndone\n' "$TQ" > "$DIR/map"
  sync
  timings \
    "qemu-img-from-qcow2" "qemu-img convert -f qcow2 -O raw '$Q' '$DIR/out.raw'" \
    "create-from-qcow2" "'$VMA' create '$DIR/out.vma' -d 'format=qcow2:drive-scsi0=$Q'"
  row "create from a qcow2 (vs \`qemu-img convert -f qcow2 -O raw\` to a sparse file) mixed" \
    "${T[create-from-qcow2]}" "${T[qemu-img-from-qcow2]}"
  timings \
    "qemu-img-to-qcow2" "qemu-img convert -f raw -O qcow2 '$IMG' '$DIR/out.qcow2'" \
    "extract-to-qcow2" "'$VMA' extract --format qcow2 '$A' '$DIR/out'"
  row "extract --format qcow2 (vs \`qemu-img convert -f raw -O qcow2\`) mixed" \
    "${T[extract-to-qcow2]}" "${T[qemu-img-to-qcow2]}"
  timings \
    "qemu-img-into-qcow2" "qemu-img create -q -f qcow2 '$TQ' $SIZE && qemu-img convert -n -f raw -O qcow2 '$IMG' '$TQ'" \
    "restore-into-qcow2" "qemu-img create -q -f qcow2 '$TQ' $SIZE && '$VMA' extract -r '$DIR/map' '$A' '$DIR/out'"
  row "restore through a map into a new qcow2 (vs \`qemu-img convert -n\`; both include \`qemu-img create\`) mixed" \
    "${T[restore-into-qcow2]}" "${T[qemu-img-into-qcow2]}"
fi

# --- seekable zstd, on a compressible image ------------------------------------------------
zrr=
if want zst; then
  IMG=$DIR/usr.raw
  { tar cf - -C / usr 2>/dev/null || true; } | head -c $((SIZE_MIB / 2 * 1048576)) > "$IMG"
  truncate -s "${SIZE_MIB}M" "$IMG"
  A=$DIR/usr.vma
  rm -f "$A" "$A.zst" "$DIR/usr.T0.zst"
  "$VMA" create "$A" -d "format=raw:drive-scsi0=$IMG"
  "$VMA" create "$A.zst" -d "format=raw:drive-scsi0=$IMG"
  zstd -q -T0 -3 "$A" -o "$DIR/usr.T0.zst"
  sync
  timings \
    "zstd-T0" "rm -f '$DIR/out.zst'; zstd -q -T0 -3 '$A' -o '$DIR/out.zst'" \
    "create-zst" "rm -f '$DIR/out.vma.zst'; '$VMA' create '$DIR/out.vma.zst' -d 'format=raw:drive-scsi0=$IMG'"
  row "create .vma.zst (vs \`zstd -T0 -3\` of the plain archive) usr" "${T[create-zst]}" "${T[zstd-T0]}"
  ours=$(stat -c %s "$A.zst"); theirs=$(stat -c %s "$DIR/usr.T0.zst")
  rows+=("| size of the .vma.zst (vs \`zstd -T0 -3\` of the plain archive; bytes) usr | $ours | $theirs | $(python3 -c "print('%.4f' % ($ours/$theirs))") |")
  timings \
    "extract-zst" "'$VMA' extract '$A.zst' '$DIR/out'" \
    "extract-plain" "'$VMA' extract '$A' '$DIR/out'"
  row "extract our .vma.zst (vs the plain archive's extract) usr" "${T[extract-zst]}" "${T[extract-plain]}"
  if command -v qemu-img >/dev/null; then
    "$VMA" serve "$A" --socket "$DIR/plain.sock" 2>/dev/null & sp=$!
    "$VMA" serve "$A.zst" --socket "$DIR/zst.sock" 2>/dev/null & sz=$!
    while [ ! -S "$DIR/plain.sock" ] || [ ! -S "$DIR/zst.sock" ]; do sleep 0.1; done
    timings \
      "serve-zst" "qemu-img convert -f raw 'nbd+unix:///drive-scsi0?socket=$DIR/zst.sock' -O raw '$DIR/out.raw'" \
      "serve-plain" "qemu-img convert -f raw 'nbd+unix:///drive-scsi0?socket=$DIR/plain.sock' -O raw '$DIR/out.raw'"
    row "qemu-img convert through vma serve of our .vma.zst (vs of the plain archive) usr" "${T[serve-zst]}" "${T[serve-plain]}"
    kill -INT $sp $sz; wait $sp $sz || true
  fi
  zrr="Random reads of the seekable .vma.zst: $("$RANDREAD" "$A.zst" "$IMG" 2000)
Of the plain archive: $("$RANDREAD" "$A" "$IMG" 20000)"
fi

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
echo "\`cat archive > /dev/null\`; compressed extract against \`zstd -dc\` to /dev/null, and against the"
echo "plain archive's extract (the floor when decompression overlaps). Each pair's commands run"
echo "interleaved (benches/timeit.py) under \`sh -c\`; medians."
echo
if want raw; then
  echo "| image | peak RSS create (MiB) | extract (MiB) | verify stdin (MiB) |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rss_rows[@]}"
  echo
  echo "$rr"
fi
if want zst; then
  echo
  echo "$zrr"
fi
