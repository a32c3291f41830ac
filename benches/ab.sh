#!/usr/bin/env bash
# Before/after: the `vma` command built from an older commit against this checkout's, in one
# run on the same inputs, rounds interleaved (benches/timeit.py). Prints a Markdown table of
# medians and the ratio after/before; a ratio above 1 is a slowdown.
#
#   benches/ab.sh BASE_REV [SIZE_MIB] [RUNS]  (defaults: 1024 MiB, 5 runs)
#
# BASE_REV is built once in a detached git worktree with its own target folder under
# target/ab/<commit>/ (a full release build, a few minutes), kept for the next run. Inputs are the mixed and 90 %-zero images of compare.sh. The page
# cache is warm for every measurement, as in compare.sh: CPU and memory costs, not disk.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${1:?usage: benches/ab.sh BASE_REV [SIZE_MIB] [RUNS]}
SIZE_MIB=${2:-1024}
RUNS=${3:-5}
for t in git python3 zstd; do command -v "$t" >/dev/null || { echo "missing $t" >&2; exit 1; }; done
base_commit=$(git rev-parse --verify "$BASE^{commit}")

DIR=${BENCH_DIR:-$(mktemp -d /var/tmp/vma-ab.XXXXXX)}
mkdir -p "$DIR"
trap 'rm -rf "$DIR"' EXIT

cargo build --release --locked -q -p vma-cli
NEW=${CARGO_TARGET_DIR:-$PWD/target}/release/vma
BASE_DIR=$PWD/target/ab/$base_commit
if [ ! -x "$BASE_DIR/target/release/vma" ]; then
  [ -d "$BASE_DIR/src" ] || git worktree add -q --detach "$BASE_DIR/src" "$base_commit"
  (cd "$BASE_DIR/src" && CARGO_TARGET_DIR="$BASE_DIR/target" cargo build --release --locked -q -p vma-cli)
fi
OLD=$BASE_DIR/target/release/vma

python3 benches/images.py "$DIR" "$SIZE_MIB" mixed zero90
sync

declare -A T
timings() {
  local name secs
  while read -r name secs; do T[$name]=$secs; done < <(
    python3 benches/timeit.py "$RUNS" --before "rm -rf '$DIR/out' '$DIR/out.vma'; sync" "$@")
}
rows=()
row() { rows+=("| $1 | ${T[$2-new]} | ${T[$2-old]} | $(python3 -c "print('%.2f' % (${T[$2-new]}/${T[$2-old]}))") |"); }
# pair NAME CMD-WITH-@VMA@: times the command with the new and the old binary, interleaved.
pair() { local name=$1 cmd=$2; timings "$name-new" "${cmd//@VMA@/$NEW}" "$name-old" "${cmd//@VMA@/$OLD}"; }

for img in mixed zero90; do
  IMG=$DIR/$img.raw
  A=$DIR/$img.vma
  "$NEW" create "$A" -d "format=raw:drive-scsi0=$IMG"
  zstd -q -f -T1 "$A" -o "$A.zst"
  pair "create-$img" "'@VMA@' create '$DIR/out.vma' -d 'format=raw:drive-scsi0=$IMG'"
  row "create $img" "create-$img"
  pair "extract-$img" "'@VMA@' extract '$A' '$DIR/out'"
  row "extract $img" "extract-$img"
  pair "extract-zst-$img" "'@VMA@' extract '$A.zst' '$DIR/out'"
  row "extract .vma.zst $img" "extract-zst-$img"
  pair "verify-$img" "'@VMA@' verify - < '$A'"
  row "verify (stream, stdin) $img" "verify-$img"
  pair "quick-$img" "'@VMA@' verify --quick '$A'"
  row "verify --quick $img" "quick-$img"
done

echo
echo "before: $base_commit; after: $(git rev-parse HEAD)$(git diff --quiet || echo ' (with uncommitted changes)')"
echo "$SIZE_MIB MiB images, median of $RUNS interleaved rounds"
echo
echo "| measurement | after (s) | before (s) | after/before |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
