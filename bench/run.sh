#!/usr/bin/env bash
# The frpx benchmark (issue 7): a fast local HTTP backend measured directly
# and through frps + frpc, back to back, on loopback only. Prints a markdown
# table and writes it to a file. See bench/README.md.
#
#   bench/run.sh                 full run (about a minute once built), release build
#   bench/run.sh --smoke         every case with tiny numbers, debug build (CI)
#   bench/run.sh --out FILE      write the table to FILE
#   bench/run.sh --cases ad      only some cases (letters a-f), for iterating
#
# Every process it starts is stopped on exit and its temp dir removed; every
# wait is bounded in time and count.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bench/run.sh [--smoke] [--out FILE] [--cases LETTERS]

  --smoke     tiny numbers and a debug build: checks that every case runs and
              yields a figure (no targets asserted); uses the Rust stand-ins
              when nginx, wrk or curl are missing
  --out FILE  where to write the table (default bench/results/latest.md,
              or bench/results/smoke.md with --smoke)
  --cases L   run only the cases whose letters are in L (default abcdef);
              rows of the others read "not run"

Environment: CARGO (cargo binary), CARGO_TARGET_DIR (build directory),
FRPX_BENCH_NO_INSTALL=1 (full mode: never apt-get install wrk/curl/nginx),
FRPX_BENCH_RUST_TOOLS=1 (smoke mode: use the Rust stand-ins even when
nginx, wrk and curl are installed), FRPX_BENCH_FRPS_WRAP (a command frps
runs under, e.g. a profiler: bench/link-order.sh uses it).
EOF
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODE=full
OUT=""
CASES=abcdef
while (($#)); do
  case $1 in
    --smoke) MODE=smoke ;;
    --out)
      OUT=${2:?--out needs a file}
      shift
      ;;
    --cases)
      CASES=${2:?--cases needs letters a-f}
      [[ $CASES =~ ^[a-f]+$ ]] || {
        echo "run.sh: --cases takes letters a-f, not '$CASES'" >&2
        exit 2
      }
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      echo "run.sh: unknown argument '$1'" >&2
      usage >&2
      exit 2
      ;;
  esac
  shift
done

want() { [[ $CASES == *$1* ]]; }
if want f && ! want a && ! want b; then
  echo "run.sh: case f measures the requests of a and b: run it with a or b (--cases abf)" >&2
  exit 2
fi

# ---------------------------------------------------------------- parameters
SSE_INTERVAL_MS=10
if [[ $MODE == smoke ]]; then
  PROFILE=debug
  LOAD_THREADS=1 LOAD_CONNS=4 LOAD_SECS=1
  BIG_BYTES=$((16 << 20)) BIG_LABEL="16 MiB"
  SSE_STREAMS=5 SSE_EVENTS=5
  SIM_CLIENTS=20 IDLE_CONNS=50
  OUT=${OUT:-$ROOT/bench/results/smoke.md}
else
  PROFILE=release
  LOAD_THREADS=2 LOAD_CONNS=50 LOAD_SECS=10
  BIG_BYTES=$((1 << 30)) BIG_LABEL="1 GiB"
  SSE_STREAMS=100 SSE_EVENTS=200
  SIM_CLIENTS=1000 IDLE_CONNS=10000
  OUT=${OUT:-$ROOT/bench/results/latest.md}
fi
CARGO=${CARGO:-cargo}

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
warn() { log "WARNING: $*"; }
die() {
  log "ERROR: $*"
  exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# ------------------------------------------------------- processes, cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/frpx-bench.XXXXXX")
PIDS=()
LAST_PID=""

# Starts "$@" in the background, output to $TMP/<name>.log; sets LAST_PID.
start_bg() {
  local name=$1
  shift
  "$@" >"$TMP/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

alive() { [[ -e /proc/$1 ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

# Stops one process we started: SIGTERM, up to 5 s (or $2 tenths of a
# second), then SIGKILL; it is then forgotten.
stop_pid() {
  local pid=$1 patience=${2:-50} i rest=()
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < patience; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for i in "${PIDS[@]}"; do [[ $i == "$pid" ]] || rest+=("$i"); done
  PIDS=("${rest[@]}")
}

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    # frps under a wrapper (callgrind: fifty times slower) needs more than
    # 5 s to drain and write its profile; killed early, it writes little.
    if [[ $pid == "${FRPS_PID:-}" && -n ${FRPX_BENCH_FRPS_WRAP:-} ]]; then
      stop_pid "$pid" 1200
    else
      stop_pid "$pid"
    fi
  done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Polls FILE until a line matches PATTERN (at most SECS seconds, and only
# while process PID lives); prints the line.
wait_log() {
  local file=$1 pattern=$2 secs=$3 pid=$4 i line
  for ((i = 0; i < secs * 20; i++)); do
    line=$(grep -m1 -E "$pattern" "$file" 2>/dev/null || true)
    if [[ -n $line ]]; then
      printf '%s\n' "$line"
      return 0
    fi
    alive "$pid" || break
    sleep 0.05
  done
  return 1
}

random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }

# ---------------------------------------------------------- machine is idle
# The load average at start is a hint (it decays slowly after a build); in a
# full run, the CPU use measured after the build is the verdict.
CORES=$(nproc)
read -r LOAD1 _ </proc/loadavg
LOAD_NOTE="load average $LOAD1 at start"
if awk -v l="$LOAD1" -v c="$CORES" 'BEGIN { exit !(l > 0.25 * c) }'; then
  warn "load average $LOAD1 on $CORES cores: the machine may not be idle"
fi

# The CPU counters now, in jiffies: "stolen busy total" (steal: time the
# hypervisor ran something else while this machine's CPUs had work; busy:
# every state but idle and iowait, steal included).
cpu_mark() {
  awk '/^cpu / { print $9, $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9 }' /proc/stat
}

# Percentage of CPU time in field $2 of cpu_mark (1 stolen, 2 busy) since
# mark $1 (empty without /proc/stat; 0 when too little time passed for the
# counters to move).
cpu_pct_since() {
  [[ -n $1 ]] || return 0
  awk -v a="$1" -v b="$(cpu_mark)" -v f="$2" 'BEGIN { split(a, x, " "); split(b, y, " ");
    t = y[3] - x[3]; printf "%.0f", (t > 0 ? 100 * (y[f] - x[f]) / t : 0) }'
}

# Percentage of CPU time stolen since mark $1.
steal_pct() { cpu_pct_since "$1" 1; }

# Percentage of CPU time spent busy over one second.
cpu_busy_pct() {
  local mark
  mark=$(cpu_mark)
  sleep 1
  cpu_pct_since "$mark" 2
}

# ----------------------------------------------------------------- tools
RUST_TOOLS=${FRPX_BENCH_RUST_TOOLS:-0}
[[ $MODE == full && $RUST_TOOLS == 1 ]] && die "FRPX_BENCH_RUST_TOOLS=1 is for --smoke only"
if [[ $MODE == full ]]; then
  missing=()
  for tool in wrk curl nginx; do have "$tool" || missing+=("$tool"); done
  if ((${#missing[@]})) && [[ ${FRPX_BENCH_NO_INSTALL:-0} != 1 ]] && have apt-get && [[ $(id -u) == 0 ]]; then
    log "installing ${missing[*]} (Debian packages; FRPX_BENCH_NO_INSTALL=1 to skip)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${missing[@]}" >&2 ||
      { apt-get update -qq >&2 && apt-get install -y -qq "${missing[@]}" >&2; } ||
      warn "could not install ${missing[*]}"
  fi
  have wrk || die "the full benchmark needs wrk (apt-get install wrk), or run --smoke"
  have curl || die "the full benchmark needs curl (apt-get install curl), or run --smoke"
fi
use_tool() { [[ $RUST_TOOLS != 1 ]] && have "$1"; }
if use_tool nginx; then BACKEND_KIND=nginx; else BACKEND_KIND=rust; fi
if use_tool wrk; then LOAD_TOOL=wrk; else LOAD_TOOL=rust; fi
if use_tool curl; then DL_TOOL=curl; else DL_TOOL=rust; fi

# Descriptors: IDLE_CONNS idle connections are held by one helper process
# and accepted by frps; both inherit this limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT=$(ulimit -n)
if [[ $FD_LIMIT != unlimited ]] && ((FD_LIMIT < IDLE_CONNS + 1024)); then
  warn "open-file limit $FD_LIMIT: holding $((FD_LIMIT - 1024)) idle connections instead of $IDLE_CONNS"
  IDLE_CONNS=$((FD_LIMIT - 1024))
fi

# ----------------------------------------------------------------- build
if [[ $PROFILE == release ]]; then
  BUILD=(build --release -p frps -p frpc -p frpx-bench)
else
  # The feature set of `cargo test --workspace`: run from the test suite,
  # this reuses its build and only links the three binaries (seconds),
  # where `build -p ...` would rebuild tokio and everything above it.
  BUILD=(build --workspace --bins --tests)
fi
log "building: $CARGO ${BUILD[*]}"
(cd "$ROOT" && "$CARGO" "${BUILD[@]}") >&2 || die "build failed"
TARGET_DIR=$(cd "$ROOT" && "$CARGO" metadata --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN=$TARGET_DIR/$PROFILE
for exe in frps frpc frpx-bench; do [[ -x $BIN/$exe ]] || die "$BIN/$exe was not built"; done
BENCH=$BIN/frpx-bench

# Release frps lays out the code it runs side by side (frps/build.rs); a
# change to frps, a dependency or the toolchain renames symbols and makes the
# list stale. A few missing names can be hot ones: 29 of 2,314 cost frps
# 0.9 MiB after the load once.
ORDER_NOTE=""
if [[ $PROFILE == release && -f $ROOT/frps/link-order.txt ]] && have nm; then
  sort -u "$ROOT/frps/link-order.txt" >"$TMP/link-order.txt"
  listed=$(wc -l <"$TMP/link-order.txt")
  found=$(nm --defined-only "$BIN/frps" 2>/dev/null | awk '{ print $NF }' | sort -u |
    comm -12 - "$TMP/link-order.txt" | wc -l)
  ORDER_NOTE="frps link order: $found of $listed listed functions found"
  log "$ORDER_NOTE"
  if ((found * 100 < listed * 99)); then
    warn "frps/link-order.txt is stale ($((listed - found)) of its symbols are gone, e's frps figure suffers): run bench/link-order.sh"
    ORDER_NOTE="$ORDER_NOTE (stale: run bench/link-order.sh)"
  fi
fi
# Release frps and frpc load no libm (common::define_pow, SQLite without
# FTS5 from .cargo/config.toml); a LIBSQLITE3_FLAGS of one's own replaces
# that setting, and libm (0.5 MiB resident) comes back.
if [[ $PROFILE == release ]] && ! have readelf; then
  log "readelf not found: not checking whether frps and frpc load libm"
elif [[ $PROFILE == release ]]; then
  for exe in frps frpc; do
    dynamic=$(readelf -d "$BIN/$exe" 2>/dev/null || true)
    if grep -q 'NEEDED.*libm\.so' <<<"$dynamic"; then
      warn "$exe loads libm (LIBSQLITE3_FLAGS set in the environment? .cargo/config.toml builds SQLite without FTS5): e's figures suffer"
      ORDER_NOTE="${ORDER_NOTE:+$ORDER_NOTE; }$exe loads libm"
    fi
  done
fi

if [[ $MODE == full ]]; then
  busy=$(cpu_busy_pct)
  log "CPU busy over the last second: $busy %"
  LOAD_NOTE="$LOAD_NOTE; CPU $busy % busy before measuring"
  if ((busy > 10)); then
    warn "something else is using $busy % of the CPU: figures will be noisy"
    LOAD_NOTE="$LOAD_NOTE (not idle: figures are noisy)"
  fi
fi

# ------------------------------------------------------------- backends
# The Rust backend always runs: it serves SSE (case d), and everything else
# when nginx is absent.
start_bg backend "$BENCH" --threads 1 backend --port 0 --big-bytes "$BIG_BYTES"
line=$(wait_log "$TMP/backend.log" '^listening ' 10 "$LAST_PID") ||
  die "the Rust backend did not start: $(cat "$TMP/backend.log")"
RUST_PORT=${line##*:}

if [[ $BACKEND_KIND == nginx ]]; then
  NGINX_PORT=$("$BENCH" free-port)
  NG=$TMP/nginx
  mkdir -p "$NG/www" "$NG/tmp"
  # nginx workers may run as another user: let them read the files.
  chmod 755 "$TMP" "$NG" "$NG/www"
  truncate -s "$BIG_BYTES" "$NG/www/big.bin"
  # Read it once so both downloads in c come from the page cache (the first
  # reader would otherwise pay for filling it).
  cat "$NG/www/big.bin" >/dev/null
  cat >"$NG/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $NG/nginx.pid;
error_log $NG/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 75s;
  keepalive_requests 1000000000;
  client_body_temp_path $NG/tmp/body;
  proxy_temp_path $NG/tmp/proxy;
  fastcgi_temp_path $NG/tmp/fastcgi;
  uwsgi_temp_path $NG/tmp/uwsgi;
  scgi_temp_path $NG/tmp/scgi;
  server {
    listen 127.0.0.1:$NGINX_PORT;
    root $NG/www;
    location = /big.bin { default_type application/octet-stream; }
    location / { default_type text/plain; return 200 "frpx bench\n"; }
  }
}
EOF
  start_bg nginx nginx -p "$NG" -c "$NG/nginx.conf" -e "$NG/error.log"
  "$BENCH" wait --url "http://127.0.0.1:$NGINX_PORT/" --timeout-secs 10 >/dev/null ||
    die "nginx did not start: $(cat "$TMP/nginx.log" "$NG/error.log" 2>/dev/null)"
  HTTP_PORT=$NGINX_PORT
  BACKEND_NOTE="nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), 1 worker, keep-alive"
else
  HTTP_PORT=$RUST_PORT
  BACKEND_NOTE="Rust (frpx-bench backend, 1 thread; nginx not used)"
fi
log "backend: $BACKEND_NOTE on port $HTTP_PORT; SSE backend on port $RUST_PORT"

# ------------------------------------------------------------ frps, frpc
KEY=bench-key-$(random_hex 16)
EMAIL=bench@frpx.invalid
PASSWORD=$(random_hex 16)
FRPS_DB=(--database-url "sqlite://$TMP/frpx.db" --redis-url none)
printf '%s\n' "$PASSWORD" |
  NO_COLOR=1 "$BIN/frps" "${FRPS_DB[@]}" user add --email "$EMAIL" --password-stdin >"$TMP/user.log" 2>&1 ||
  die "cannot create the bench account: $(cat "$TMP/user.log")"

# The backends' paths (/, /big.bin, /sse, /whoami) are no model API, so
# every path is forwarded (--forward-paths '*'; the default list's check is
# a few string comparisons more per request).
# shellcheck disable=SC2086 # the wrapper is a command line, split on purpose
start_bg frps env NO_COLOR=1 ${FRPX_BENCH_FRPS_WRAP:-} "$BIN/frps" "${FRPS_DB[@]}" --bind-addr 127.0.0.1 --api-bind 127.0.0.1 \
  --control-port 0 --proxy-port 0 --public-port 0 --api-port 0 \
  --api-key "$KEY" --shutdown-timeout 2s --forward-paths '*'
FRPS_PID=$LAST_PID
line=$(wait_log "$TMP/frps.log" 'frps listening:' 30 "$FRPS_PID") ||
  die "frps did not start: $(tail -n 20 "$TMP/frps.log")"
port_of() { sed -n "s/.* $1 [0-9.]*:\([0-9]*\).*/\1/p" <<<"$line"; }
CONTROL=$(port_of control) PROXY=$(port_of proxy) PUBLIC=$(port_of public) API=$(port_of api)
[[ -n $CONTROL && -n $PROXY && -n $PUBLIC && -n $API ]] || die "cannot read frps's ports from: $line"
log "frps: control $CONTROL, proxy $PROXY, public $PUBLIC"

FRPC_PID=""
# Starts frpc exposing local port $1 and waits until the public port answers
# (with the body containing $2, when given).
start_frpc() {
  local port=$1 contains=${2:-} path=/
  [[ -n $contains ]] && path=/whoami
  # Plaintext on loopback: frpc may send the password without TLS here.
  start_bg "frpc-$port" env NO_COLOR=1 FRPC_EMAIL="$EMAIL" FRPC_PASSWORD="$PASSWORD" \
    FRPC_INSECURE_PLAINTEXT=true \
    "$BIN/frpc" --server-addr 127.0.0.1 --control-port "$CONTROL" --proxy-port "$PROXY" \
    --local-port "$port" --client-id bench --no-prompt --token-file "$TMP/frpc/token.json"
  FRPC_PID=$LAST_PID
  "$BENCH" wait --url "http://127.0.0.1:$PUBLIC$path" --key "$KEY" --contains "$contains" \
    --timeout-secs 30 >/dev/null 2>"$TMP/wait.log" ||
    die "frpc did not register: $(cat "$TMP/wait.log"; tail -n 20 "$TMP/frpc-$port.log")"
}
start_frpc "$HTTP_PORT"
log "frpc registered"

DIRECT=http://127.0.0.1:$HTTP_PORT
FRPX=http://127.0.0.1:$PUBLIC

# ------------------------------------------------------------ measuring
declare -A R=()
FAILED=()
fail_case() {
  FAILED+=("$1")
  warn "case $1 failed: $2"
}

# An awk program reading wrk's --latency report; prints "requests/s p50 p99
# errors", durations (850.00us, 1.20ms, 2.00s, 1.00m) in microseconds.
# shellcheck disable=SC2016 # awk's $ fields, not shell expansions
WRK_PARSE='
  function us(v) {
    if (v ~ /us$/) { sub(/us$/, "", v); return v + 0 }
    if (v ~ /ms$/) { sub(/ms$/, "", v); return v * 1000 }
    if (v ~ /m$/)  { sub(/m$/, "", v);  return v * 60000000 }
    if (v ~ /s$/)  { sub(/s$/, "", v);  return v * 1000000 }
    return v + 0
  }
  $1 == "50%" { p50 = us($2) }
  $1 == "99%" { p99 = us($2) }
  /^Requests\/sec:/ { rps = $2 }
  /Non-2xx or 3xx responses:/ { errors += $5 }
  /Socket errors:/ { gsub(",", ""); errors += $4 + $6 + $8 + $10 }
  END { if (rps == "" || p50 == "" || p99 == "") exit 1; printf "%s %s %s %d\n", rps, p50, p99, errors }'

# Runs the request load against URL ($2; $3=1 for a new connection per
# request) and stores R[$1_rps], R[$1_p50], R[$1_p99] (µs).
measure_load() {
  local key=$1 url=$2 close=$3 out=$TMP/$1.txt fig mark
  mark=$(cpu_mark 2>/dev/null || true)
  if [[ $LOAD_TOOL == wrk ]]; then
    local args=(-t"$LOAD_THREADS" -c"$LOAD_CONNS" -d"${LOAD_SECS}s" --latency
      -H "Authorization: Bearer $KEY")
    ((close)) && args+=(-H "Connection: close")
    timeout $((LOAD_SECS + 60)) wrk "${args[@]}" "$url/" >"$out" 2>&1 || return 1
    fig=$(awk "$WRK_PARSE" "$out") || return 1
  else
    local args=(--url "$url/" --key "$KEY" --connections "$LOAD_CONNS" --duration-secs "$LOAD_SECS")
    ((close)) && args+=(--close)
    timeout $((LOAD_SECS + 60)) "$BENCH" load "${args[@]}" >"$out" 2>&1 || return 1
    fig=$(sed -n 's/.*rps=\([^ ]*\) p50_us=\([^ ]*\) p99_us=\([^ ]*\) errors=\([^ ]*\).*/\1 \2 \3 \4/p' "$out")
    [[ -n $fig ]] || return 1
  fi
  local rps p50 p99 errors
  read -r rps p50 p99 errors <<<"$fig"
  R[${key}_rps]=$rps R[${key}_p50]=$p50 R[${key}_p99]=$p99
  R[${key}_steal]=$(steal_pct "$mark")
  ((errors == 0)) || {
    log "$key: $errors failed requests (see below)"
    cat "$out" >&2
    return 1
  }
}

# Downloads /big.bin from $2 and stores R[$1_gbps].
measure_download() {
  local key=$1 url=$2/big.bin out=$TMP/$1.txt code size secs mark
  mark=$(cpu_mark 2>/dev/null || true)
  if [[ $DL_TOOL == curl ]]; then
    timeout 300 curl -sS --max-time 240 -o /dev/null -H "Authorization: Bearer $KEY" \
      -w '%{http_code} %{size_download} %{time_total}\n' "$url" >"$out" 2>&1 || return 1
    read -r code size secs <"$out"
  else
    timeout 300 "$BENCH" download --url "$url" --key "$KEY" --timeout-secs 240 >"$out" 2>&1 || return 1
    read -r code size secs < <(sed -n 's/.*status=\([0-9]*\) bytes=\([0-9]*\) secs=\([0-9.]*\).*/\1 \2 \3/p' "$out")
  fi
  [[ ${code:-} == 200 && ${size:-} == "$BIG_BYTES" ]] || {
    log "$key: expected 200 and $BIG_BYTES bytes, got: $(cat "$out")"
    return 1
  }
  R[${key}_gbps]=$(awk -v b="$size" -v s="$secs" 'BEGIN { printf "%.3f", b * 8 / s / 1e9 }')
  R[${key}_steal]=$(steal_pct "$mark")
}

# Runs the SSE streams against $2 and stores R[$1_p50], R[$1_p99],
# R[$1_max] (µs) and R[$1_late].
measure_sse() {
  local key=$1 url=$2/sse out=$TMP/$1.txt fig
  timeout 180 "$BENCH" sse --url "$url" --key "$KEY" --streams "$SSE_STREAMS" \
    --events "$SSE_EVENTS" --interval-ms "$SSE_INTERVAL_MS" --timeout-secs 120 >"$out" 2>&1 || {
    cat "$out" >&2
    return 1
  }
  fig=$(sed -n 's/.*p50_us=\([^ ]*\) p99_us=\([^ ]*\) max_us=\([^ ]*\) late=\([0-9]*\).*/\1 \2 \3 \4/p' "$out")
  [[ -n $fig ]] || return 1
  read -r "R[${key}_p50]" "R[${key}_p99]" "R[${key}_max]" "R[${key}_late]" <<<"$fig"
}

# VmRSS, VmHWM, RssAnon and RssFile (KiB) of process $2 into R[$1_rss],
# R[$1_hwm], R[$1_anon], R[$1_file]: how much of the RSS is heap and stacks,
# how much the binary's own pages.
measure_memory() {
  local fig
  fig=$(awk '/^VmRSS:/ { r = $2 } /^VmHWM:/ { h = $2 } /^RssAnon:/ { a = $2 } /^RssFile:/ { f = $2 }
    END { if (r == "") exit 1; print r, h, a, f }' "/proc/$2/status" 2>/dev/null) || return 1
  read -r "R[${1}_rss]" "R[${1}_hwm]" "R[${1}_anon]" "R[${1}_file]" <<<"$fig"
  # FRPX_BENCH_SMAPS=DIR keeps the process's mappings as read (DIR/$1.smaps).
  if [[ -n ${FRPX_BENCH_SMAPS:-} ]]; then
    mkdir -p "$FRPX_BENCH_SMAPS" && cp "/proc/$2/smaps" "$FRPX_BENCH_SMAPS/$1.smaps" 2>/dev/null || true
  fi
}

# Reads key=value pairs of a helper's output line into R[$1_<key>].
read_pairs() {
  local prefix=$1 file=$2 pair
  for pair in $(tail -n 1 "$file"); do
    [[ $pair == *=* ]] && R[${prefix}_${pair%%=*}]=${pair#*=}
  done
  return 0
}

LOAD_DESC="wrk -t$LOAD_THREADS -c$LOAD_CONNS -d${LOAD_SECS}s"
[[ $LOAD_TOOL == rust ]] && LOAD_DESC="frpx-bench load -c$LOAD_CONNS -d${LOAD_SECS}s"


METRICS=http://127.0.0.1:$API/metrics
if want a; then
  log "a. small requests, keep-alive ($LOAD_DESC)"
  measure_load a_direct "$DIRECT" 0 || fail_case a "direct run failed"
fi
# f: frps's own histogram, over the requests of a and b through frpx.
if want f; then
  "$BENCH" histogram --url "$METRICS" --save "$TMP/f_before.txt" >/dev/null 2>"$TMP/f.txt" ||
    fail_case f "cannot read $METRICS: $(cat "$TMP/f.txt")"
fi
if want a; then
  measure_load a_frpx "$FRPX" 0 || fail_case a "run through frpx failed"
fi

if want b; then
  log "b. a new connection per request ($LOAD_DESC, Connection: close)"
  measure_load b_direct "$DIRECT" 1 || fail_case b "direct run failed"
  measure_load b_frpx "$FRPX" 1 || fail_case b "run through frpx failed"
fi
if want f && [[ -f $TMP/f_before.txt ]]; then
  if "$BENCH" histogram --url "$METRICS" --since "$TMP/f_before.txt" >"$TMP/f.txt" 2>&1; then
    read_pairs f "$TMP/f.txt"
    [[ ${R[f_count]:-0} -gt 0 && ${R[f_p50_us]:-none} != none ]] ||
      fail_case f "no request was measured: $(cat "$TMP/f.txt")"
  else
    fail_case f "cannot read $METRICS: $(cat "$TMP/f.txt")"
  fi
fi

if want c; then
  log "c. one $BIG_LABEL download ($DL_TOOL)"
  measure_download c_direct "$DIRECT" || fail_case c "direct download failed"
  measure_download c_frpx "$FRPX" || fail_case c "download through frpx failed"
fi

if want e; then
  log "e. memory after $(tr -d 'def' <<<"$CASES" | sed 's/./&, /g; s/, $//')"
  measure_memory e_frps "$FRPS_PID" || fail_case e "cannot read frps's memory"
  measure_memory e_frpc "$FRPC_PID" || fail_case e "cannot read frpc's memory"
fi

if want d; then
  log "d. SSE: $SSE_STREAMS streams x $SSE_EVENTS events, one every $SSE_INTERVAL_MS ms"
  measure_sse d_direct "http://127.0.0.1:$RUST_PORT" || fail_case d "direct streams failed"
  if [[ $HTTP_PORT != "$RUST_PORT" ]]; then
    # Point the tunnel at the SSE backend: a new frpc replaces the old one.
    stop_pid "$FRPC_PID"
    start_frpc "$RUST_PORT" "frpx-bench backend"
  fi
  measure_sse d_frpx "$FRPX" || fail_case d "streams through frpx failed"
fi

# Many connections come from many loopback addresses (127.1.0.x), at most
# 100 each, as from many callers: frps caps connections per address.
sources() { echo $((($1 + 99) / 100)); }

if want e; then
  log "e. frps with $SIM_CLIENTS simulated clients"
  # They log in with the client token the bench frpc saved at its first login.
  TOKEN=$(sed -n 's/.*"token": *"\([^"]*\)".*/\1/p' "$TMP/frpc/token.json" 2>/dev/null || true)
  if [[ -z $TOKEN ]]; then
    fail_case e "no client token in $TMP/frpc/token.json"
  else
    if timeout 300 "$BENCH" clients --control "127.0.0.1:$CONTROL" --token "$TOKEN" \
      --count "$SIM_CLIENTS" --sources "$(sources "$SIM_CLIENTS")" --pid "$FRPS_PID" \
      --timeout-secs 240 >"$TMP/e_clients.txt" 2>&1; then
      read_pairs e_clients "$TMP/e_clients.txt"
    else
      fail_case e "simulated clients failed: $(tail -n 5 "$TMP/e_clients.txt")"
    fi
  fi

  log "e. frps with $IDLE_CONNS idle public connections"
  if timeout 300 "$BENCH" idle --url "$FRPX/" --key "$KEY" --count "$IDLE_CONNS" \
    --sources "$(sources "$IDLE_CONNS")" --pid "$FRPS_PID" --timeout-secs 240 >"$TMP/e_idle.txt" 2>&1; then
    read_pairs e_idle "$TMP/e_idle.txt"
  else
    fail_case e "idle connections failed: $(tail -n 5 "$TMP/e_idle.txt")"
  fi
  if [[ -n ${R[e_idle_open]:-} && ${R[e_idle_open]} != "${R[e_idle_connections]:-}" ]]; then
    fail_case e "only ${R[e_idle_open]} of ${R[e_idle_connections]} idle connections were still open"
  fi
fi

# ------------------------------------------------------------ the table
# 1234567 -> 1,234,567
thousands() { sed ':a; s/\B[0-9]\{3\}\>/,&/; ta' <<<"$1"; }

# Prints R[$1] formatted by $2 (rate, gbps, us, mib), or "error".
fig() {
  local v=${R[$1]:-}
  if ! want "${1:0:1}"; then
    printf 'not run'
    return
  fi
  if [[ -z $v ]]; then
    printf 'error'
    return
  fi
  case ${2:-raw} in
    rate) thousands "$(awk -v v="$v" 'BEGIN { printf "%.0f", v }')" ;;
    gbps) printf '%s Gbit/s' "$v" ;;
    us) awk -v v="$v" 'BEGIN { if (v < 1000) printf "%.0f µs", v; else printf "%.2f ms", v / 1000 }' ;;
    mib) awk -v v="$v" 'BEGIN { printf "%.1f MiB", v / 1024 }' ;;
    *) printf '%s' "$v" ;;
  esac
}
# frpx / direct for R[$1] and R[$2].
ratio() {
  local a=${R[$1]:-} b=${R[$2]:-}
  want "${1:0:1}" || {
    printf '—'
    return
  }
  [[ -n $a && -n $b ]] || {
    printf 'error'
    return
  }
  awk -v a="$a" -v b="$b" 'BEGIN { if (a > 0) printf "%.2f×", b / a; else printf "n/a" }'
}
# frpx - direct for R[$1] and R[$2] (µs), as added latency.
added() {
  local a=${R[$1]:-} b=${R[$2]:-}
  want "${1:0:1}" || {
    printf '—'
    return
  }
  [[ -n $a && -n $b ]] || {
    printf 'error'
    return
  }
  awk -v a="$a" -v b="$b" 'BEGIN { d = b - a; s = d < 0 ? "−" : "+"; d = d < 0 ? -d : d;
    if (d < 1000) printf "%s%.0f µs added", s, d; else printf "%s%.2f ms added", s, d / 1000 }'
}
# Verdict on a target, in full mode only: $1 is an awk condition on v.
verdict() {
  [[ $MODE == full ]] || return 0
  local v=$1 cond=$2
  [[ -n $v ]] || return 0
  if awk -v v="$v" "BEGIN { exit !($cond) }"; then printf ' — met'; else printf ' — missed'; fi
}
ratio_value() { awk -v a="${R[$1]:-0}" -v b="${R[$2]:-0}" 'BEGIN { if (a > 0) print b / a }'; }
diff_value() {
  [[ -n ${R[$1]:-} && -n ${R[$2]:-} ]] && awk -v a="${R[$1]}" -v b="${R[$2]}" 'BEGIN { print b - a }'
}

row() { printf '| %s | %s | %s | %s | %s |\n' "$@"; }

REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null) ]] && REV="$REV + uncommitted changes"
DL_DESC=$DL_TOOL
[[ $DL_TOOL == rust ]] && DL_DESC="frpx-bench download"
SSE_DESC="$SSE_STREAMS streams × $SSE_EVENTS events, one per $SSE_INTERVAL_MS ms"

# CPU the hypervisor took while a, b and c ran: a ratio is only fair when
# both sides of it had the machine to the same degree.
STEAL_NOTE="" STOLEN=0
for c in a b c; do
  d=${R[${c}_direct_steal]:-} f=${R[${c}_frpx_steal]:-}
  [[ -n $d || -n $f ]] || continue
  STEAL_NOTE="$STEAL_NOTE${STEAL_NOTE:+, }$c ${d:-?} % / ${f:-?} %"
  for v in $d $f; do if ((v > STOLEN)); then STOLEN=$v; fi; done
done
if [[ -n $STEAL_NOTE ]]; then
  STEAL_NOTE="CPU stolen by the hypervisor while measuring (direct / frpx): $STEAL_NOTE"
  if ((STOLEN > 5)); then
    warn "the hypervisor took up to $STOLEN % of the CPU during the measurements: figures and ratios are unreliable"
    STEAL_NOTE="$STEAL_NOTE (over 5 %: the machine was shared, figures are unreliable)"
  fi
fi

TABLE=$(
  printf '# frpx benchmark (%s mode)\n\n' "$MODE"
  printf -- '- when: %s; frpx %s, %s build\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" "$REV" "$PROFILE"
  [[ $CASES == abcdef ]] || printf -- '- cases run: %s (--cases); the others read "not run"\n' "$CASES"
  printf -- '- machine: %s cores, Linux %s; %s\n' "$CORES" "$(uname -r)" "$LOAD_NOTE"
  printf -- '- backend: %s; SSE from the Rust backend\n' "$BACKEND_NOTE"
  [[ -z $ORDER_NOTE ]] || printf -- '- %s\n' "$ORDER_NOTE"
  [[ -z $STEAL_NOTE ]] || printf -- '- %s\n' "$STEAL_NOTE"
  # shellcheck disable=SC2016 # backquotes are markdown here
  printf -- '- load: %s; download: %s; every request carries `Authorization: Bearer <key>`\n\n' \
    "$LOAD_DESC" "$DL_DESC"
  row case direct frpx ×direct "target (issue 7)"
  row --- --- --- --- ---
  row "a. small requests, keep-alive: requests/s" "$(fig a_direct_rps rate)" "$(fig a_frpx_rps rate)" \
    "$(ratio a_direct_rps a_frpx_rps)" "≥ 0.55×$(verdict "$(ratio_value a_direct_rps a_frpx_rps)" 'v >= 0.55')"
  row "a. small requests, keep-alive: p50" "$(fig a_direct_p50 us)" "$(fig a_frpx_p50 us)" \
    "$(ratio a_direct_p50 a_frpx_p50)" ""
  row "a. small requests, keep-alive: p99" "$(fig a_direct_p99 us)" "$(fig a_frpx_p99 us)" \
    "$(ratio a_direct_p99 a_frpx_p99)" ""
  row "b. new connection per request: requests/s" "$(fig b_direct_rps rate)" "$(fig b_frpx_rps rate)" \
    "$(ratio b_direct_rps b_frpx_rps)" "≥ 0.5×$(verdict "$(ratio_value b_direct_rps b_frpx_rps)" 'v >= 0.5')"
  row "b. new connection per request: p50" "$(fig b_direct_p50 us)" "$(fig b_frpx_p50 us)" \
    "$(ratio b_direct_p50 b_frpx_p50)" ""
  row "b. new connection per request: p99" "$(fig b_direct_p99 us)" "$(fig b_frpx_p99 us)" \
    "$(ratio b_direct_p99 b_frpx_p99)" ""
  row "c. one $BIG_LABEL download" "$(fig c_direct_gbps gbps)" "$(fig c_frpx_gbps gbps)" \
    "$(ratio c_direct_gbps c_frpx_gbps)" "≥ 0.45×$(verdict "$(ratio_value c_direct_gbps c_frpx_gbps)" 'v >= 0.45')"
  row "d. SSE write→read, $SSE_DESC: p50" "$(fig d_direct_p50 us)" "$(fig d_frpx_p50 us)" \
    "$(added d_direct_p50 d_frpx_p50)" ""
  row "d. SSE write→read: p99" "$(fig d_direct_p99 us)" "$(fig d_frpx_p99 us)" \
    "$(added d_direct_p99 d_frpx_p99)" "< 2 ms added$(verdict "$(diff_value d_direct_p99 d_frpx_p99)" 'v < 2000')"
  row "d. SSE write→read: max (events ≥ $SSE_INTERVAL_MS ms late)" \
    "$(fig d_direct_max us) ($(fig d_direct_late raw) late)" "$(fig d_frpx_max us) ($(fig d_frpx_late raw) late)" \
    "$(added d_direct_max d_frpx_max)" "no event held back$(verdict "${R[d_frpx_late]:-}" 'v == 0')"
  row "e. frps after a–c: RSS (peak) [anonymous + file-backed]" — \
    "$(fig e_frps_rss mib) ($(fig e_frps_hwm mib)) [$(fig e_frps_anon mib) + $(fig e_frps_file mib)]" — \
    "< 10 MiB RSS$(verdict "${R[e_frps_rss]:-}" 'v < 10240')"
  row "e. frpc after a–c: RSS (peak) [anonymous + file-backed]" — \
    "$(fig e_frpc_rss mib) ($(fig e_frpc_hwm mib)) [$(fig e_frpc_anon mib) + $(fig e_frpc_file mib)]" — \
    "< 10 MiB RSS$(verdict "${R[e_frpc_rss]:-}" 'v < 10240')"
  row "e. frps with $(thousands "$SIM_CLIENTS") registered clients: RSS (peak)" — \
    "$(fig e_clients_rss_kib mib) ($(fig e_clients_hwm_kib mib))" — \
    "< 60 MiB with 1,000$(verdict "${R[e_clients_rss_kib]:-}" 'v < 61440')"
  row "e. frps with $(thousands "$IDLE_CONNS") idle public keep-alive connections: RSS (peak)" — \
    "$(fig e_idle_rss_kib mib) ($(fig e_idle_hwm_kib mib))" — \
    "< 150 MiB with 10,000$(verdict "${R[e_idle_rss_kib]:-}" 'v < 153600')"
  row "f. gateway overhead per request (frps's own measure, $(thousands "${R[f_count]:-0}") requests of a and b): p50" \
    — "$(fig f_p50_us us)" — "< 50 µs$(verdict "${R[f_p50_us]:-}" 'v < 50')"
  row "f. gateway overhead per request: p99" — "$(fig f_p99_us us)" — "< 500 µs$(verdict "${R[f_p99_us]:-}" 'v < 500')"
  printf '\n'
  printf 'Ratios within one run are what count; absolute figures move between runs.\n'
  printf 'e: with the bench frpc registered too; RSS read by the helper while every client / connection is open.\n'
  if ((${#FAILED[@]})); then
    printf '\nFAILED cases: %s (see the log above).\n' "${FAILED[*]}"
  fi
)

mkdir -p "$(dirname "$OUT")"
printf '%s\n' "$TABLE" | tee "$OUT"
MISSING=$(grep -c '^|.*error' "$OUT" || true)
log "results written to $OUT"
if ((${#FAILED[@]})) || ((MISSING > 0)); then
  log "FAILED: ${FAILED[*]:-} ${MISSING} missing figure(s)"
  exit 1
fi
