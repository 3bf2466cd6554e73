#!/usr/bin/env bash
# CAVI benchmarks against peers, in one run on this machine, printed as one
# table with ratios. Servers run pinned to one core, the load generator to
# another. Everything listens on loopback and stops by itself.
#
#   bench/run.sh                      # full run (about 10 minutes)
#   BENCH_DURATION=3 BENCH_MEMORY_KEYS=100000 bench/run.sh   # quick look
#
# Peers: a bare axum handler returning a constant (the HTTP ceiling of this
# machine), the node as it was at BENCH_BASELINE (a git revision, built in
# a worktree under target/bench-baseline; default: the head of the first
# wave; `none` skips it), etcd through its HTTP/JSON gateway, redis-server
# with redis-benchmark. Tools come from Debian packages and are installed
# if missing.
#
# After the wall-clock table, bench/instructions.py counts instructions per
# request under callgrind (BENCH_INSTRUCTIONS=0 skips it): the figure to
# optimise against on a noisy machine.
set -euo pipefail
cd "$(dirname "$0")/.."

DUR=${BENCH_DURATION:-10}
ROUNDS=${BENCH_ROUNDS:-3}
WINDOW=$((DUR / 2 > 2 ? DUR / 2 : 2))
CONNS=${BENCH_CONNECTIONS:-64}
MEM_KEYS=${BENCH_MEMORY_KEYS:-1000000}
SERVER_CPU=${BENCH_SERVER_CPU:-0}
CLIENT_CPU=${BENCH_CLIENT_CPU:-1}
WARM_KEYS=10000
LOAD_KEYS=${BENCH_LOAD_KEYS:-200000}
MOVE_KEYS=${BENCH_MOVE_KEYS:-100000}
BASELINE=${BENCH_BASELINE:-cc4bef3}
INSTRUCTIONS=${BENCH_INSTRUCTIONS:-1}

log() { printf '%s\n' "-- $*" >&2; }

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
command -v etcd >/dev/null || need+=(etcd-server)
command -v taskset >/dev/null || need+=(util-linux)
[ "$INSTRUCTIONS" = 0 ] || command -v valgrind >/dev/null || need+=(valgrind)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

log "building release binaries"
cargo build --release -q --bin kvstore-api --bin cavi --example ceiling
NODE=$PWD/target/release/kvstore-api
CAVI=$PWD/target/release/cavi
CEILING=$PWD/target/release/examples/ceiling

OLD_NODE=""
if [ "$BASELINE" != none ]; then
  base_dir=$PWD/target/bench-baseline
  rev=$(git rev-parse --short "$BASELINE")
  if [ ! -x "$base_dir/$rev/target/release/kvstore-api" ]; then
    log "building the baseline node at $rev"
    git worktree remove --force "$base_dir/$rev/src" 2>/dev/null || true
    git worktree prune
    mkdir -p "$base_dir/$rev"
    git worktree add -f --detach "$base_dir/$rev/src" "$rev" >/dev/null
    (cd "$base_dir/$rev/src" && CARGO_TARGET_DIR=$base_dir/$rev/target cargo build --release -q --bin kvstore-api)
  fi
  OLD_NODE=$base_dir/$rev/target/release/kvstore-api
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Ports outside the ephemeral range, all different (scripts/free_port.py).
free_port() { python3 scripts/free_port.py "$work/ports"; }

# serve NAME CMD...: start a server pinned to the server core.
serve() {
  local name=$1; shift
  RUST_LOG=warn taskset -c "$SERVER_CPU" "$@" >"$work/$name.log" 2>&1 &
  pids+=($!)
  last_pid=$!
}

stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# wait_http URL [METHOD]: waits for a 2xx answer.
wait_http() {
  for _ in $(seq 200); do
    curl -fs -o /dev/null -X "${2:-GET}" "$1" && return 0
    sleep 0.05
  done
  echo "no answer from $1" >&2
  exit 1
}

# load URL MODE PREFIX KEYS [STOP] -> sets rps p50 p99 errors
# With STOP=1 wrk writes each key once, then is interrupted.
load() {
  local url=$1 mode=$2 prefix=$3 keys=$4 stopping=${5:-0}
  local out=$work/wrk.out marker=$work/wrk.done duration=${LOAD_SECONDS:-$DUR}
  rm -f "$marker"
  [ "$stopping" = 1 ] && duration=900
  MODE=$mode PREFIX=$prefix KEYS=$keys STOP=$stopping DONE_FILE=$marker \
    taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d"${duration}s" --latency -s bench/wrk.lua "$url" >"$out" &
  local wrk_pid=$!
  if [ "$stopping" = 1 ]; then
    while [ ! -e "$marker" ] && kill -0 "$wrk_pid" 2>/dev/null; do sleep 0.1; done
    kill -INT "$wrk_pid" 2>/dev/null || true
  fi
  wait "$wrk_pid" || true
  read -r _ rps p50 p99 errors < <(grep '^RESULT' "$out")
  if [ "$errors" != 0 ] && [ "$stopping" != 1 ]; then
    log "warning: $errors errors during $mode on $url"
  fi
}

# rounds NAME URL MODE PREFIX KEYS [NAME URL ...]: ROUNDS rounds of one
# WINDOW-second load of each scenario in turn, the order reversed every
# other round, so that a machine whose speed drifts weighs on each alike.
# A target compares two scenarios round by round, a few seconds apart,
# instead of two runs minutes apart. Each run's "req/s p50 p99" is added
# to $work/rounds/NAME.
rounds() {
  local specs=("$@") n=$(($# / 5)) r j i
  mkdir -p "$work/rounds"
  for ((r = 0; r < ROUNDS; r++)); do
    for ((j = 0; j < n; j++)); do
      i=$((r % 2 ? n - 1 - j : j))
      LOAD_SECONDS=$WINDOW load "${specs[@]:$((i * 5 + 1)):4}"
      echo "$rps $p50 $p99" >>"$work/rounds/${specs[$((i * 5))]}"
    done
  done
}
# median NAME: sets rps p50 p99 to their medians over NAME's rounds.
median() {
  read -r rps p50 p99 < <(python3 -c 'import sys, statistics as st
rows = [[float(x) for x in line.split()] for line in open(sys.argv[1])]
print(*(round(st.median(col)) for col in zip(*rows)))' "$work/rounds/$1")
}
# paired A B: A's req/s against B's in the same round, as the median and
# the range over the rounds: "0.97x (rounds 0.94-1.02x)".
paired() {
  python3 -c 'import sys, statistics as st
a, b = ([float(line.split()[0]) for line in open(f)] for f in sys.argv[1:])
r = sorted(x / y for x, y in zip(a, b))
print(f"{st.median(r):.2f}x (rounds {r[0]:.2f}-{r[-1]:.2f}x)")' "$work/rounds/$1" "$work/rounds/$2"
}

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

rows=()
row() { rows+=("$(printf '%-34s %10s %9s %9s   %s' "$1" "$2" "$3" "$4" "${5:-}")"); }
ms() { awk -v us="$1" 'BEGIN { printf "%.2f", us / 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'; }
measured() { row "$1" "$rps" "$(ms "$p50")" "$(ms "$p99")" "${2:-}"; }

# --- HTTP ceiling --------------------------------------------------------
# ceiling LABEL: measures the bare handler answering a constant, for
# reference. The targets compare with the ceiling under the same requests,
# measured in rounds beside each build (two_shards).
ceiling() {
  local port
  port=$(free_port)
  serve ceiling "$CEILING" "127.0.0.1:$port"
  wait_http "http://127.0.0.1:$port/"
  log "HTTP ceiling"
  load "http://127.0.0.1:$port" constant a 1
  measured "$1"
  stop "$last_pid"
}
ceiling "HTTP ceiling (bare axum, constant)"

# two_ranges END START: a layout of shard 0 on a..END at $p0 and shard 1 on
# START..z at $p1.
two_ranges() {
  printf 'shards:\n  - { id: 0, addr: "127.0.0.1:%s", range_start: "a", range_end: "%s" }\n' "$p0" "$1"
  printf '  - { id: 1, addr: "127.0.0.1:%s", range_start: "%s", range_end: "z" }\n' "$p1" "$2"
}

# --- CAVI in memory, two shards ------------------------------------------
# two_shards BINARY LABEL [TARGETS]: local and forwarded GET, PUT and a
# 2-shard search of one build; sets two_local two_fwd two_put (medians).
# The ceiling runs beside the node and gets the very same requests, round
# by round: wrk's own cost per request differs between request streams
# (a GET's key is formatted in Lua, its answer is longer), and wrk's core
# is as busy as the server's, so a ceiling measured with another stream
# would charge the node for wrk's work. The constant stream of the first
# row is measured in the same rounds, for comparison with earlier runs.
two_shards() {
  local bin=$1 label=$2 targets=${3:-} pc pcp
  p0=$(free_port); p1=$(free_port); pc=$(free_port); pcp=$(free_port)
  two_ranges m n >"$work/two.yaml"
  serve two "$bin" all "$work/two.yaml"
  local pid=$last_pid
  serve ceiling "$CEILING" "127.0.0.1:$pc"
  local ceiling_pid=$last_pid
  serve ceiling-put "$CEILING" "127.0.0.1:$pcp" put
  local ceiling_put_pid=$last_pid
  wait_http "http://127.0.0.1:$p0/readyz"; wait_http "http://127.0.0.1:$p1/readyz"
  wait_http "http://127.0.0.1:$pc/"
  wait_http "http://127.0.0.1:$pcp/" PUT
  load "http://127.0.0.1:$p0" put a "$WARM_KEYS" 1
  load "http://127.0.0.1:$p1" put n "$WARM_KEYS" 1
  log "$label: ceiling, local GET and forwarded GET, $ROUNDS rounds"
  rounds "$label-constant" "http://127.0.0.1:$pc" constant a 1 \
    "$label-ceiling-get" "http://127.0.0.1:$pc" get a "$WARM_KEYS" \
    "$label-get" "http://127.0.0.1:$p0" get a "$WARM_KEYS" \
    "$label-fwd" "http://127.0.0.1:$p1" get a "$WARM_KEYS"
  median "$label-ceiling-get"
  measured "  ceiling, the same GETs"
  median "$label-get"
  two_local=$rps
  measured "$label local GET" "$(paired "$label-get" "$label-ceiling-get") of ceiling${targets:+ (target >= 0.90x)}; $(paired "$label-get" "$label-constant") of the constant one"
  median "$label-fwd"
  two_fwd=$rps
  measured "$label forwarded GET" "$(paired "$label-fwd" "$label-get") of its local GET${targets:+ (target >= 0.45x)}"
  log "$label: ceiling and PUT, $ROUNDS rounds"
  rounds "$label-ceiling-put" "http://127.0.0.1:$pcp" put b "$WARM_KEYS" \
    "$label-put" "http://127.0.0.1:$p0" put b "$WARM_KEYS"
  stop "$ceiling_pid"; stop "$ceiling_put_pid"
  median "$label-ceiling-put"
  measured "  ceiling, the same PUTs"
  median "$label-put"
  two_put=$rps
  measured "$label PUT (memory)" "$(paired "$label-put" "$label-ceiling-put") of ceiling${targets:+ (target >= 0.85x)}; $(paired "$label-put" "$label-constant") of the constant one"
  log "$label: search over 2 shards"
  load "http://127.0.0.1:$p0" search a 1
  measured "$label search, 2 shards (limit=10)"
  stop "$pid"
}

# eight_shards BINARY LABEL: a search with limit=10 over 8 shards of 100
# keys each; sets eight_search.
eight_shards() {
  local bin=$1 label=$2
  ports=()
  for _ in 1 2 3 4 5 6 7 8; do ports+=("$(free_port)"); done
  starts=("" d g j m p s v)
  ends=(c f i l o r u "")
  {
    echo "shards:"
    for i in 0 1 2 3 4 5 6 7; do
      printf '  - { id: %d, addr: "127.0.0.1:%s", range_start: "%s"' "$i" "${ports[$i]}" "${starts[$i]}"
      if [ -n "${ends[$i]}" ]; then printf ', range_end: "%s" }\n' "${ends[$i]}"; else printf ' }\n'; fi
    done
  } >"$work/eight.yaml"
  serve eight "$bin" all "$work/eight.yaml"
  local pid=$last_pid
  for p in "${ports[@]}"; do wait_http "http://127.0.0.1:$p/readyz"; done
  for i in 0 1 2 3 4 5 6 7; do load "http://127.0.0.1:${ports[0]}" put "${starts[$i]:-a}" 100 1; done
  log "$label: search over 8 shards"
  load "http://127.0.0.1:${ports[0]}" search a 1
  eight_search=$rps
  measured "$label search, 8 shards (limit=10)"
  stop "$pid"
}

baseline_note() { rows+=("$(printf '%-34s %10s %9s %9s   %s' "  vs baseline" "" "" "" "$1")"); }

if [ -n "$OLD_NODE" ]; then
  two_shards "$OLD_NODE" "baseline"
  old_local=$two_local old_fwd=$two_fwd old_put=$two_put
  eight_shards "$OLD_NODE" "baseline"
  old_search=$eight_search
fi
two_shards "$NODE" "CAVI" targets
local_rps=$two_local
if [ -n "$OLD_NODE" ]; then
  baseline_note "GET $(ratio "$two_local" "$old_local"), forwarded $(ratio "$two_fwd" "$old_fwd"), PUT $(ratio "$two_put" "$old_put")"
fi
eight_shards "$NODE" "CAVI"
if [ -n "$OLD_NODE" ]; then
  baseline_note "search $(ratio "$eight_search" "$old_search") (target >= 3.00x)"
fi

# --- cavi load: routed to owners vs through one entry node ---------------
p0=$(free_port); p1=$(free_port)
two_ranges m n >"$work/two.yaml"
# Keys alternate between the two shards; 100-byte values.
awk -v n="$LOAD_KEYS" 'BEGIN {
  v = sprintf("%100s", ""); gsub(/ /, "v", v)
  for (i = 0; i < n; i++) printf "{\"key\":\"%s%015d\",\"value\":\"%s\"}\n", (i % 2 ? "n" : "a"), i, v
}' >"$work/load.jsonl"
# cavi_load LABEL [FLAGS...]: loads every key into a fresh cluster; sets
# load_secs load_rate stored load_writes (writes a commit on a durable
# first shard).
cavi_load() {
  local label=$1; shift
  local flags=() node_flags=()
  # --data-dir DIR goes to the nodes, every other flag to cavi.
  while [ $# -gt 0 ]; do
    if [ "$1" = --data-dir ]; then node_flags=(--data-dir "$2"); shift 2; else flags+=("$1"); shift; fi
  done
  serve load "$NODE" all "$work/two.yaml" "${node_flags[@]}"
  local pid=$last_pid start end
  wait_http "http://127.0.0.1:$p0/readyz"; wait_http "http://127.0.0.1:$p1/readyz"
  log "cavi load, $label"
  start=$(date +%s.%N)
  taskset -c "$CLIENT_CPU" "$CAVI" -e "http://127.0.0.1:$p0" "${flags[@]}" load "$work/load.jsonl" --concurrency "$CONNS" >/dev/null
  end=$(date +%s.%N)
  load_writes=$(curl -fs "http://127.0.0.1:$p0/metrics" | awk '
    $1 == "cavi_storage_commits_total" { c = $2 } $1 == "cavi_storage_committed_writes_total" { w = $2 }
    END { if (c > 0) printf "%.1f", w / c; else print "-" }')
  stored=$(( $(curl -fs "http://127.0.0.1:$p0/cluster" | python3 -c 'import json,sys; print(json.load(sys.stdin)["keys"])') \
    + $(curl -fs "http://127.0.0.1:$p1/cluster" | python3 -c 'import json,sys; print(json.load(sys.stdin)["keys"])') ))
  load_secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')
  load_rate=$(awk -v s="$load_secs" -v n="$LOAD_KEYS" 'BEGIN { printf "%.0f", n / s }')
  stop "$pid"
}
cavi_load "through one entry node" --no-routing
entry_rate=$load_rate
row "cavi load --no-routing (keys/s)" "$load_rate" "" "" "$LOAD_KEYS keys in $load_secs s, $stored stored"
cavi_load "routed to owners"
routed_rate=$load_rate
row "cavi load, routed (keys/s)" "$load_rate" "" "" "$LOAD_KEYS keys in $load_secs s, $stored stored; $(ratio "$load_rate" "$entry_rate") of --no-routing (target >= 1.80x)"
# The same into durable owners: their PUTs go one to a connection, not
# pipelined, so that they share group commits.
cavi_load "routed to durable owners" --data-dir "$work/load-data"
row "cavi load, routed, durable (keys/s)" "$load_rate" "" "" "$LOAD_KEYS keys in $load_secs s, $stored stored; $(ratio "$load_rate" "$routed_rate") of memory owners; $load_writes writes a commit"

# --- Resharding: a range moved between live nodes under load -------------
# Shard 0 holds a..m with MOVE_KEYS keys of 1,000-byte values in h..m; a
# reshard moves h..m to shard 1 while wrk GETs a-keys from shard 0 (the
# source), then moves it back while wrk PUTs them (shard 0 is then the
# target). Each move is compared with the same wrk load run right before
# it, and the pair is repeated ROUNDS times: one move's window is under
# two seconds, and a stall of a few milliseconds moves its p99 by a whole
# unit.
p0=$(free_port); p1=$(free_port)
two_ranges m n >"$work/move-before.yaml"
two_ranges g h >"$work/move-after.yaml"
serve move "$NODE" all "$work/move-before.yaml" ${BENCH_MOVE_RATE:+--move-rate "$BENCH_MOVE_RATE"}
move_pid=$last_pid
wait_http "http://127.0.0.1:$p0/readyz"; wait_http "http://127.0.0.1:$p1/readyz"
load "http://127.0.0.1:$p0" put a "$WARM_KEYS" 1
log "resharding: loading $MOVE_KEYS keys of 1,000 bytes into h..m"
VALUE_BYTES=1000 load "http://127.0.0.1:$p0" put h "$MOVE_KEYS" 1

# during MODE LAYOUT: wrk runs MODE against shard 0 for exactly as long as
# `cavi reshard` takes to reach LAYOUT; sets rps p50 p99 move_secs.
during() {
  local mode=$1 layout=$2 wrk_pid start end
  MODE=$mode PREFIX=a KEYS=$WARM_KEYS STOP=0 \
    taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d900s --latency -s bench/wrk.lua "http://127.0.0.1:$p0" >"$work/wrk.out" &
  wrk_pid=$!
  start=$(date +%s.%N)
  "$CAVI" -e "http://127.0.0.1:$p0" reshard -f "$layout" >/dev/null 2>"$work/reshard.log" || {
    cat "$work/reshard.log" >&2
    exit 1
  }
  end=$(date +%s.%N)
  kill -INT "$wrk_pid" 2>/dev/null || true
  wait "$wrk_pid" || true
  read -r _ rps p50 p99 _ < <(grep '^RESULT' "$work/wrk.out")
  move_secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')
}
node_bytes() { curl -fs "http://127.0.0.1:$1/cluster" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes"])'; }
node_keys() { curl -fs "http://127.0.0.1:$1/cluster" | python3 -c 'import json,sys; print(json.load(sys.stdin)["keys"])'; }
# moved NAME MODE LAYOUT BYTES KEYS: one move under MODE, after the same
# load without a move; adds "req/s p50 p99" before and "req/s p50 p99
# seconds bytes keys" during to $work/rounds/NAME-before and NAME.
moved() {
  local name=$1 mode=$2 layout=$3
  LOAD_SECONDS=$WINDOW load "http://127.0.0.1:$p0" "$mode" a "$WARM_KEYS"
  echo "$rps $p50 $p99" >>"$work/rounds/$name-before"
  during "$mode" "$layout"
  echo "$rps $p50 $p99 $move_secs $("$4") $("$5")" >>"$work/rounds/$name"
}
out_bytes() { node_bytes "$p1"; }
out_keys() { node_keys "$p1"; }
back_bytes() { tail -n1 "$work/rounds/move-out" | cut -d' ' -f5; }
back_keys() { echo $(($(node_keys "$p0") - WARM_KEYS)); }
# move_rows NAME WHAT LOAD: the move's row and its load's row, medians
# over the rounds with their range.
move_rows() {
  local lines
  mapfile -t lines < <(python3 - "$work/rounds/$1-before" "$work/rounds/$1" <<'PY'
import sys, statistics as st
before = [[float(x) for x in l.split()] for l in open(sys.argv[1])]
during = [[float(x) for x in l.split()] for l in open(sys.argv[2])]
def spread(values, fmt):
    v = sorted(values)
    return fmt.format(st.median(v)), (fmt + "-" + fmt).format(v[0], v[-1])
mbs = spread([d[4] / 1e6 / d[3] for d in during], "{:.0f}")
keys = spread([d[5] / d[3] for d in during], "{:.0f}")
fg = spread([d[0] / b[0] for b, d in zip(before, during)], "{:.2f}")
p99 = spread([d[2] / b[2] for b, d in zip(before, during)], "{:.2f}")
m = sorted(during, key=lambda d: d[3])[len(during) // 2]
print(f"{m[5]:.0f} keys, {m[4] / 1e6:.0f} MB in {m[3]:.2f} s: {mbs[0]} MB/s (moves {mbs[1]}), {keys[0]} keys/s (target >= 50 MB/s)")
print(*(round(st.median(c)) for c in list(zip(*during))[:3]))
print(f"{fg[0]}x of before (moves {fg[1]}x; target >= 0.70x), p99 {p99[0]}x of before (moves {p99[1]}x; target <= 2.00x)")
PY
  )
  row "reshard: $2" "" "" "" "${lines[0]}"
  read -r rps p50 p99 <<<"${lines[1]}"
  measured "  $3, during" "${lines[2]}"
}

for ((r = 0; r < ROUNDS; r++)); do
  log "resharding, round $((r + 1)) of $ROUNDS: h..m to shard 1 under GETs"
  moved move-out get "$work/move-after.yaml" out_bytes out_keys
  log "resharding, round $((r + 1)) of $ROUNDS: h..m back to shard 0 under PUTs"
  moved move-back put "$work/move-before.yaml" back_bytes back_keys
done
move_rows move-out "h..m from shard 0 to 1" "GET on the source"
move_rows move-back "h..m back from shard 1 to 0" "PUT on the target"
stop "$move_pid"

# --- Resharding between durable nodes, no foreground load ----------------
# The same range out and back between two nodes on disk, timed from start
# to done: the target's synced pages and the source's clean-up included.
p0=$(free_port); p1=$(free_port)
two_ranges m n >"$work/dmove-before.yaml"
two_ranges g h >"$work/dmove-after.yaml"
serve dmove "$NODE" all "$work/dmove-before.yaml" --data-dir "$work/dmove-data"
dmove_pid=$last_pid
wait_http "http://127.0.0.1:$p0/readyz"; wait_http "http://127.0.0.1:$p1/readyz"
log "resharding between durable nodes: loading $MOVE_KEYS keys of 1,000 bytes into h..m"
VALUE_BYTES=1000 load "http://127.0.0.1:$p0" put h "$MOVE_KEYS" 1
dmove_bytes=$(node_bytes "$p0")
dmoves=()
for layout in after before; do
  log "resharding between durable nodes: h..m $layout"
  start=$(date +%s.%N)
  "$CAVI" -e "http://127.0.0.1:$p0" reshard -f "$work/dmove-$layout.yaml" >/dev/null 2>"$work/reshard.log" || {
    cat "$work/reshard.log" >&2
    exit 1
  }
  end=$(date +%s.%N)
  dmoves+=("$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')")
done
row "reshard between durable nodes" "" "" "" "$(awk -v b="$dmove_bytes" -v o="${dmoves[0]}" -v k="${dmoves[1]}" -v n="$(node_keys "$p0")" \
  'BEGIN { printf "%d keys, %.0f MB out in %.2f s (%.0f MB/s), back in %.2f s (%.0f MB/s), clean-up included", n, b / 1e6, o, b / 1e6 / o, k, b / 1e6 / k }')"
stop "$dmove_pid"

# --- Durable: CAVI on disk vs etcd ---------------------------------------
# The durable node and its peer, the same one-shard node in memory, take
# PUTs in alternating rounds.
pd=$(free_port); pmem=$(free_port)
printf 'shards:\n  - { id: 0, addr: "127.0.0.1:%s" }\n' "$pd" >"$work/one.yaml"
printf 'shards:\n  - { id: 0, addr: "127.0.0.1:%s" }\n' "$pmem" >"$work/one-memory.yaml"
serve disk "$NODE" 0 "$work/one.yaml" --data-dir "$work/cavi-data"
disk_pid=$last_pid
serve one-memory "$NODE" 0 "$work/one-memory.yaml"
one_memory_pid=$last_pid
wait_http "http://127.0.0.1:$pd/readyz"; wait_http "http://127.0.0.1:$pmem/readyz"
log "durable PUT and memory PUT, $ROUNDS rounds"
rounds durable-put "http://127.0.0.1:$pd" put a "$WARM_KEYS" \
  memory-put "http://127.0.0.1:$pmem" put a "$WARM_KEYS"
stop "$one_memory_pid"
# How many writes shared each sync over those rounds, from the node's own
# counters.
per_commit=$(curl -fs "http://127.0.0.1:$pd/metrics" | awk '
  $1 == "cavi_storage_commits_total" { c = $2 }
  $1 == "cavi_storage_committed_writes_total" { w = $2 }
  END { if (c > 0) printf "%.1f", w / c; else print "?" }')
median durable-put
durable_rps=$rps
durable_row=("$rps" "$(ms "$p50")" "$(ms "$p99")")
durable_vs_memory=$(paired durable-put memory-put)
median memory-put
memory_row=("$rps" "$(ms "$p50")" "$(ms "$p99")")
log "GET from disk"
load "http://127.0.0.1:$pd" get a "$WARM_KEYS"
disk_get=("$rps" "$(ms "$p50")" "$(ms "$p99")")
stop "$disk_pid"

pe=$(free_port); pp=$(free_port)
serve etcd etcd --name bench --data-dir "$work/etcd" \
  --listen-client-urls "http://127.0.0.1:$pe" --advertise-client-urls "http://127.0.0.1:$pe" \
  --listen-peer-urls "http://127.0.0.1:$pp" --initial-advertise-peer-urls "http://127.0.0.1:$pp" \
  --initial-cluster "bench=http://127.0.0.1:$pp"
etcd_pid=$last_pid
wait_http "http://127.0.0.1:$pe/health"
log "etcd PUT"
load "http://127.0.0.1:$pe" etcd_put a "$WARM_KEYS"
etcd_rps=$rps
row "durable PUT (disk, fsync per ack)" "${durable_row[@]}" "$(ratio "$durable_rps" "$etcd_rps") of etcd PUT (target >= 2.00x), $durable_vs_memory of memory PUT (target >= 0.50x); $per_commit writes a commit"
row "  memory PUT, one shard" "${memory_row[@]}"
measured "etcd PUT (HTTP gateway, fsync)"
row "GET from disk" "${disk_get[@]}" "$(ratio "${disk_get[0]}" "$local_rps") of GET from memory"
stop "$etcd_pid"

# --- redis-benchmark -----------------------------------------------------
pr=$(free_port)
serve redis redis-server --port "$pr" --save "" --appendonly no
redis_pid=$last_pid
for _ in $(seq 100); do redis-cli -p "$pr" ping >/dev/null 2>&1 && break; sleep 0.05; done
log "redis-benchmark"
taskset -c "$CLIENT_CPU" redis-benchmark -p "$pr" -c "$CONNS" -n $((DUR * 40000)) -d 100 -r "$WARM_KEYS" -t set,get --csv -q \
  >"$work/redis.csv"
redis_get=0
while IFS=, read -r test r _avg _min p50r _p95 p99r _max; do
  test=${test//\"/}; r=${r//\"/}; p50r=${p50r//\"/}; p99r=${p99r//\"/}
  case $test in
    GET | SET)
      [ "$test" = GET ] && redis_get=$r
      row "redis-benchmark $test" "${r%.*}" "$p50r" "$p99r" ;;
  esac
done <"$work/redis.csv"
rows+=("$(printf '%-34s %10s %9s %9s   %s' "CAVI local GET vs redis GET" "" "" "" "$(ratio "$local_rps" "$redis_get") (target >= 1.00x)")")
stop "$redis_pid"

# --- Memory per key ------------------------------------------------------
log "memory: loading $MEM_KEYS keys into a CAVI node"
pm=$(free_port)
printf 'shards:\n  - { id: 0, addr: "127.0.0.1:%s" }\n' "$pm" >"$work/mem.yaml"
serve mem "$NODE" 0 "$work/mem.yaml"
mem_pid=$last_pid
wait_http "http://127.0.0.1:$pm/readyz"
before=$(rss_kib "$mem_pid")
load "http://127.0.0.1:$pm" put k "$MEM_KEYS" 1
after=$(rss_kib "$mem_pid")
stored=$(curl -fs "http://127.0.0.1:$pm/cluster" | python3 -c 'import json,sys; print(json.load(sys.stdin)["keys"])')
cavi_bpk=$(awk -v a="$after" -v b="$before" -v n="$stored" 'BEGIN { printf "%.0f", (a - b) * 1024 / n }')
stop "$mem_pid"

log "memory: loading $MEM_KEYS keys into redis-server"
pr=$(free_port)
serve redis-mem redis-server --port "$pr" --save "" --appendonly no
redis_pid=$last_pid
for _ in $(seq 100); do redis-cli -p "$pr" ping >/dev/null 2>&1 && break; sleep 0.05; done
before=$(rss_kib "$redis_pid")
awk -v n="$MEM_KEYS" 'BEGIN {
  v = sprintf("%100s", ""); gsub(/ /, "v", v)
  for (i = 0; i < n; i++) { k = sprintf("k%015d", i); printf "*3\r\n$3\r\nSET\r\n$16\r\n%s\r\n$100\r\n%s\r\n", k, v }
}' | redis-cli -p "$pr" --pipe >/dev/null
after=$(rss_kib "$redis_pid")
rkeys=$(redis-cli -p "$pr" dbsize)
redis_bpk=$(awk -v a="$after" -v b="$before" -v n="$rkeys" 'BEGIN { printf "%.0f", (a - b) * 1024 / n }')
stop "$redis_pid"

cpu=$(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | sed 's/^ *//')
printf '\nCAVI benchmark: %s s per run, %s connections, wrk -t1 on cpu %s, servers on cpu %s (%s)\n\n' \
  "$DUR" "$CONNS" "$CLIENT_CPU" "$SERVER_CPU" "$cpu"
printf '%-34s %10s %9s %9s   %s\n' "scenario" "req/s" "p50 ms" "p99 ms" "ratio"
printf '%s\n' "${rows[@]}"
printf '\n%-34s %10s\n' "memory after $stored keys (16 B keys, 100 B values)" "bytes/key"
printf '%-34s %10s\n' "CAVI node (RSS growth / keys)" "$cavi_bpk"
printf '%-34s %10s\n' "redis-server (RSS growth / keys)" "$redis_bpk"
printf '%-34s %10s\n' "CAVI / redis" "$(ratio "$cavi_bpk" "$redis_bpk")"
printf '%-34s %10s\n' "CAVI target" "<= 140"

if [ "$INSTRUCTIONS" != 0 ]; then
  log "instructions per request (callgrind)"
  python3 bench/instructions.py --node "$NODE" --ceiling "$CEILING" ${OLD_NODE:+--baseline "$OLD_NODE"}
fi
