# Shared helpers of the focused benchmark scripts (bench/ratelimit.sh, bench/observability.sh):
# sourced, not run. Expects `$work` (a temp dir) and the `pids` array of the caller.

fail() { echo "$(basename "$0"): $*" >&2; exit 1; }

# tools, installed with apt only when missing (their services are not left running)
need_tools() {  # command:package ...
  local missing=()
  for tool in "$@"; do command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}"); done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    systemctl disable --now nginx redis-server 2>/dev/null || true
  fi
}

# the upstream: NGINX returning a fixed 100-byte body on 127.0.0.1:18080, on CPU 1
start_upstream() {
  local body
  body=$(head -c 100 /dev/zero | tr '\0' 'x')
  cat > "$work/up.conf" <<NGX
worker_processes 1; daemon off; pid $work/up.pid; error_log $work/up.err warn;
events { worker_connections 8192; }
http { access_log off; keepalive_requests 10000000; keepalive_timeout 120s;
  client_body_temp_path $work/b; proxy_temp_path $work/p; fastcgi_temp_path $work/f; uwsgi_temp_path $work/u; scgi_temp_path $work/s;
  server { listen 127.0.0.1:18080; location / { default_type text/plain; return 200 "$body"; } } }
NGX
  taskset -c 1 nginx -p "$work" -c "$work/up.conf" -e "$work/up.err" & pids+=($!)
}

wait_port() {  # port: until something accepts connections on 127.0.0.1:port (10 s at most)
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  fail "nothing listens on 127.0.0.1:$1"
}

# a port answered but one of our processes died (the port was taken, or a config error)
all_alive() {
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || fail "process $pid exited at start (port in use?)"; done
}

# wrk on CPU 1: a 2 s warm-up (and 0.2 s for its last requests to finish), then the measured
# run, with latency percentiles, into $work/wrk.out
warm() { taskset -c 1 wrk -t1 -c50 -d2s "http://127.0.0.1:$1$2" >/dev/null 2>&1 || true; sleep 0.2; }
measure() { taskset -c 1 wrk -t1 -c50 -d"$DURATION" --latency "http://127.0.0.1:$1$2" > "$work/wrk.out"; }
wrk_field() {  # rps | requests | p50 | p99 | non2xx, from $work/wrk.out (latencies in µs)
  awk -v want="$1" '
    function us(v) { n = v + 0
      if (v ~ /us$/) return n; if (v ~ /ms$/) return n * 1000; if (v ~ /m$/) return n * 60e6
      if (v ~ /s$/) return n * 1e6; return n }
    /^Requests\/sec:/ { rps = $2 }
    / requests in /   { requests = $1 }
    $1 == "50%"       { p50 = us($2) }
    $1 == "99%"       { p99 = us($2) }
    /Non-2xx or 3xx responses:/ { non2xx = $NF }
    END {
      if (want == "rps") print rps; else if (want == "requests") print requests
      else if (want == "p50") printf "%.0f\n", p50; else if (want == "p99") printf "%.0f\n", p99
      else print non2xx + 0 }' "$work/wrk.out"
}

cpu_ticks() {  # pid: user + system CPU time of a process so far, in clock ticks (1/100 s)
  awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END{print (NR%2)? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# replaces the block between `<!-- NAME:begin` and `<!-- NAME:end -->` in a doc with a file
splice_doc() {  # doc name file
  if grep -q "<!-- $2:begin" "$1"; then
    awk -v block="$(cat "$3")" -v begin="<!-- $2:begin" -v end="<!-- $2:end -->" '
      index($0, begin) == 1 { print block; skip=1; next }
      index($0, end) == 1 { skip=0; next }
      !skip { print }' "$1" > "$1.tmp" && mv "$1.tmp" "$1"
  fi
}
