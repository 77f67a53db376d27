#!/usr/bin/env bash
# Rewrites frps/link-order.txt: the functions of the release frps that run
# during one full benchmark (start-up, cases a-f, the simulated clients and
# idle connections, shutdown), as callgrind saw them. frps/build.rs hands
# the list to the linker, which places those functions side by side, so the
# code frps runs takes fewer pages of memory (bench/README.md).
#
#   bench/link-order.sh          needs valgrind, plus what bench/run.sh needs
#
# Run it after a change to frps, a dependency update or a toolchain update
# (bench/run.sh reports a stale list), then rebuild: cargo build --release -p frps -p frpc -p frpx-bench (the list is made for that build; -p frps alone names about half its functions differently). It takes a few minutes:
# frps runs some fifty times slower under callgrind.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { printf '[link-order %s] %s\n' "$(date +%T)" "$*" >&2; }
command -v valgrind >/dev/null || {
  log "ERROR: valgrind is not installed (apt-get install valgrind)"
  exit 1
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/frpx-link-order.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

log "running the benchmark with frps under callgrind"
FRPX_BENCH_FRPS_WRAP="valgrind --tool=callgrind --demangle=no --callgrind-out-file=$WORK/callgrind.out" \
  "$ROOT/bench/run.sh" --out "$WORK/table.md" >&2
[[ -s $WORK/callgrind.out ]] || {
  log "ERROR: callgrind wrote no profile"
  exit 1
}

# callgrind names each object (ob=/cob=) and function (fn=/cfn=) in full the
# first time, as "(id) name", and by "(id)" after that. Every fn= line
# under the frps object is a function that ran; "'2" marks recursion.
awk '
  function name(line, table,   id, rest) {
    id = line; sub(/\).*/, "", id); sub(/^.*\(/, "", id)
    rest = line; sub(/^[^)]*\) ?/, "", rest)
    if (rest != "") table[id] = rest
    return table[id]
  }
  /^c?ob=/ { o = name($0, objs); if ($0 ~ /^ob=/) in_frps = (o ~ /\/frps$/); next }
  /^c?fn=/ {
    f = name($0, fns)
    if ($0 ~ /^fn=/ && in_frps) {
      sub(/\047[0-9]+$/, "", f)
      if (f !~ /^0x/ && !(f in seen)) { seen[f] = 1; print f }
    }
  }
' "$WORK/callgrind.out" >"$WORK/link-order.txt"

count=$(wc -l <"$WORK/link-order.txt")
((count > 500)) || {
  log "ERROR: only $count functions found in the profile"
  exit 1
}
mv "$WORK/link-order.txt" "$ROOT/frps/link-order.txt"
log "wrote frps/link-order.txt ($count functions); apply it with: cargo build --release -p frps -p frpc -p frpx-bench"
