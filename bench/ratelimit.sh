#!/usr/bin/env bash
# What rate limiting costs: requests per second (and wrk's p50/p99) of routes with three
# never-refusing rules (per client IP, per client IP and route, per request class), as a ratio of
# the same public route without limits, in one interleaved run, pinned like bench/run.sh
# (Portcullis on CPU 0 with one worker, wrk, the upstream and Redis on CPU 1).
#   plain   gateway A (bench/ratelimit.yaml), no rate limits: the baseline
#   local3  gateway A, the three rules in memory
#   fast3   gateway B (bench/ratelimit-redis.yaml, redis_mode: fast): decided locally, counts
#           synced with Redis every 50ms
#   exact3  gateway C (the same file, redis_mode: exact): one EVALSHA per request; the script
#           counts them in Redis' INFO commandstats to report requests per Redis round trip
# Only one gateway is loaded at a time. Writes its table into docs/benchmarks.md between the
# ratelimit-bench markers.
#
#   bench/ratelimit.sh                  # 3 rounds of 10 s
#   ROUNDS=5 DURATION=5s bench/ratelimit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10s}
REDIS_PORT=16379

work=$(mktemp -d)
pids=()
# every process this script started, then the temp dir (`|| true`: some may already be gone)
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
source bench/lib.sh

need_tools nginx:nginx wrk:wrk redis-server:redis-server redis-cli:redis-tools
cargo build --release --locked
bin=./target/release/portcullis

start_upstream

# Redis on CPU 1, nothing persisted
taskset -c 1 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$work" --logfile "$work/redis.log" & pids+=($!)

# the three gateways, all on CPU 0 (only one is loaded at a time)
taskset -c 0 "$bin" run --config bench/ratelimit.yaml & pids+=($!)
RL_PORT=18091 RL_MODE=fast taskset -c 0 "$bin" run --config bench/ratelimit-redis.yaml & pids+=($!)
RL_PORT=18092 RL_MODE=exact taskset -c 0 "$bin" run --config bench/ratelimit-redis.yaml & pids+=($!)

for port in 18080 "$REDIS_PORT" 18090 18091 18092; do wait_port "$port"; done
all_alive
rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@" | tr -d '\r'; }
[ "$(rcli ping)" = PONG ] || fail "redis-server does not answer"
rcli flushall >/dev/null

evalsha_calls() {  # EVALSHA calls Redis has executed so far (cmdstat_evalsha:calls=N,...)
  rcli info commandstats | awk -F'[:,=]' '/^cmdstat_evalsha:/{n=$3} END{print n+0}'
}

# every route answers 200 through the gateway; the limited ones carry RateLimit-Policy
check() {  # port path limited(yes/no)
  local headers
  headers=$(curl -s -o /dev/null -D - "http://127.0.0.1:$1$2") || fail "no answer on :$1$2"
  echo "$headers" | head -1 | grep -q ' 200' || fail ":$1$2 did not answer 200: $(echo "$headers" | head -1)"
  if [ "$3" = yes ]; then
    echo "$headers" | grep -qi '^ratelimit-policy:' || fail ":$1$2 sent no RateLimit-Policy header"
  fi
}
check 18090 /plain no
check 18090 /local3 yes
# fast mode: the request is decided locally, then the next sync (within 50ms) runs one EVALSHA
before=$(evalsha_calls)
check 18091 /limited yes
sleep 0.3
[ "$(evalsha_calls)" -gt "$before" ] || fail "fast mode (:18091) never synced with Redis"
# exact mode: the request itself runs the script in Redis
before=$(evalsha_calls)
check 18092 /limited yes
[ "$(evalsha_calls)" -gt "$before" ] || fail "exact mode (:18092) did not ask Redis"

declare -A rps ratio p50 p99
names=(plain local3 fast3 exact3)
declare -A target=([plain]="18090 /plain" [local3]="18090 /local3" [fast3]="18091 /limited" [exact3]="18092 /limited")
exact_evalsha=0 exact_requests=0 fast_evalsha=0 fast_requests=0
for r in $(seq "$ROUNDS"); do
  line="round $r"
  for n in "${names[@]}"; do
    set -- ${target[$n]}
    warm "$1" "$2"
    before=$(evalsha_calls)
    measure "$1" "$2"
    sleep 0.2  # in-flight requests and fast mode's last sync reach Redis
    after=$(evalsha_calls)
    [ "$(wrk_field non2xx)" = 0 ] || fail "$n: $(wrk_field non2xx) responses were not 2xx (a limit refused?)"
    this=$(wrk_field rps)
    [ "$n" = plain ] && base=$this
    rps[$n]="${rps[$n]:-} $this"
    ratio[$n]="${ratio[$n]:-} $(awk -v a="$this" -v b="$base" 'BEGIN{printf "%.3f", a/b}')"
    p50[$n]="${p50[$n]:-} $(wrk_field p50)"
    p99[$n]="${p99[$n]:-} $(wrk_field p99)"
    case $n in
      exact3) exact_evalsha=$((exact_evalsha + after - before)); exact_requests=$((exact_requests + $(wrk_field requests))) ;;
      fast3) fast_evalsha=$((fast_evalsha + after - before)); fast_requests=$((fast_requests + $(wrk_field requests))) ;;
    esac
    line="$line $n=$this($(echo "${ratio[$n]}" | awk '{print $NF}'), p50/p99 $(wrk_field p50)/$(wrk_field p99) µs)"
  done
  echo "$line"
done
[ "$exact_evalsha" -gt 0 ] || fail "exact mode ran no EVALSHA during the measured runs (Redis unreachable, failing open?)"
[ "$fast_evalsha" -gt 0 ] || fail "fast mode never synced with Redis during the measured runs"

declare -A label=(
  [plain]="plain (no rate limits)"
  [local3]="local3 (3 rules, store: memory)"
  [fast3]="fast3 (3 rules, redis_mode: fast)"
  [exact3]="exact3 (3 rules, redis_mode: exact)"
)
redis_version=$(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')
{
  echo "<!-- ratelimit-bench:begin (generated by bench/ratelimit.sh; do not edit by hand) -->"
  echo "Run: $(date -u +%Y-%m-%dT%H:%MZ), pinned, ${ROUNDS} rounds × ${DURATION}, 50 connections; portcullis $(git rev-parse --short HEAD 2>/dev/null || echo '?'), Redis ${redis_version:-?}."
  echo
  echo "| route | requests/s (median) | ratio to plain | p50 | p99 |"
  echo "|---|---|---|---|---|"
  for n in "${names[@]}"; do
    echo "| ${label[$n]} | $(echo "${rps[$n]}" | median) | $(echo "${ratio[$n]}" | median) | $(echo "${p50[$n]}" | median) µs | $(echo "${p99[$n]}" | median) µs |"
  done
  echo
  echo "exact mode: $exact_evalsha EVALSHA for $exact_requests requests = $(awk -v m="$exact_requests" -v n="$exact_evalsha" 'BEGIN{printf "%.3f", m/n}') requests per round trip"
  echo "(fast mode: $fast_evalsha EVALSHA syncs for $fast_requests requests)."
  echo "<!-- ratelimit-bench:end -->"
} > bench/ratelimit-latest.md
cat bench/ratelimit-latest.md
splice_doc docs/benchmarks.md ratelimit-bench bench/ratelimit-latest.md
