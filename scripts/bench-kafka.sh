#!/usr/bin/env bash
# bench-kafka: pre-produce N events (default 2M; 1M users, 10 journeys, ~30% touching a journey)
# into an 8-partition topic, then time one `waymark run` from offset 0 until every input record is
# consumed, and, beside it, a consume-only pass over the same topic (`waymark tail`). Prints
# events/s for both and waymark's peak RSS.
set -euo pipefail
bin=${1:?usage: bench-kafka.sh WAYMARK_BINARY [BROKERS]}
brokers=${2:-127.0.0.1:9092}
# shellcheck source=scripts/bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
bench_setup bench 2000000 1000000 9470 kafka
echo "producing $count events to $topic..."
t0=$(date +%s.%N)
"$bin" produce --brokers "$brokers" --topic "$topic" "$dir/events.jsonl"
t1=$(date +%s.%N)
echo "produce: $(echo "$count / ($t1 - $t0)" | bc) events/s"

echo "consume-only pass..."
t0=$(date +%s.%N)
"$bin" tail --brokers "$brokers" --count "$count" --idle 20s "$topic" > /dev/null
t1=$(date +%s.%N)
consume_rate=$(echo "$count / ($t1 - $t0)" | bc)
echo "consume-only: $consume_rate events/s"

echo "waymark run from offset 0..."
rm -rf "$dir/state"
bpid=$(broker_pid)
broker_cpu0=$(cpu_seconds "$bpid")
t0=$(date +%s.%N)
# BENCH_FETCH_WAIT_MS: waymark's consumer fetch.wait.max.ms (default 100). tansu holds every fetch
# that long even when records are there (Apache Kafka answers as soon as one is), so on tansu it
# is the floor of the latency: see BENCHMARKS.md.
if [ -n "${BENCH_FETCH_WAIT_MS:-}" ]; then export WAYMARK_KAFKA_CONSUMER_PROPERTIES_FETCH_WAIT_MAX_MS=$BENCH_FETCH_WAIT_MS; fi
/usr/bin/time -v "$bin" run --brokers "$brokers" --group-id "bench-$suffix" --journeys-dir "$dir/journeys" \
  --state-dir "$dir/state" --metrics-addr "127.0.0.1:$port" > "$dir/run.log" 2> "$dir/time.txt" &
pid=$!
unset WAYMARK_KAFKA_CONSUMER_PROPERTIES_FETCH_WAIT_MAX_MS
consumed=0
while [ "$consumed" -lt "$count" ]; do
  sleep 0.5
  consumed=$({ curl -s "127.0.0.1:$port/metrics" || true; } | awk -v t="$topic" '$1 ~ "^waymark_events_consumed_total" && index($1, "topic=\"" t "\"") {s += $2} END {printf "%d", s}')
  kill -0 $pid 2>/dev/null || { echo "waymark exited early"; tail "$dir/time.txt"; exit 1; }
done
t1=$(date +%s.%N)
run_rate=$(echo "$count / ($t1 - $t0)" | bc)
echo "waymark run: $run_rate events/s ($(echo "scale=1; 100 * $run_rate / $consume_rate" | bc)% of consume-only)"
# Who used the machine's cores meanwhile: waymark (the child of /usr/bin/time) and the broker.
wpid=$(pgrep -P $pid | head -1)
echo "CPU during the run ($(echo "scale=2; ($t1 - $t0) / 1" | bc) s wall, $(nproc) cores): waymark $(cpu_seconds "$wpid") s, broker $(echo "$(cpu_seconds "$bpid") - $broker_cpu0" | bc) s"

# Latency at half that rate: the same instance, caught up, gets more events at run_rate / 2;
# waymark_processing_latency_seconds (record timestamp to outputs acknowledged) is read before and
# after, and p50/p99 come from the difference of its buckets.
half=$(( run_rate / 2 ))
extra=$(( half * 10 ))
[ "$extra" -gt "$count" ] && extra=$count
snapshot() { curl -s "127.0.0.1:$port/metrics" | awk '/^waymark_processing_latency_seconds_bucket/ {match($0, /le="[^"]+"/); le=substr($0, RSTART+4, RLENGTH-5); print le, $2}'; }
snapshot > "$dir/lat-before.txt"
echo "latency phase: $extra events at $half events/s..."
# The clients' own round trips meanwhile (waymark_client_latency_seconds, sampled each second).
( while true; do curl -s "127.0.0.1:$port/metrics" | grep '^waymark_client_latency_seconds'; sleep 1; done ) > "$dir/client-latency.txt" 2>/dev/null &
sampler=$!
# Live events are stamped now (--retime; BENCH_LATENCY_RETIME=0 keeps the load's old stamps, which
# makes every delay and timeout they start due at once: a backlog's timer bursts, not live traffic).
retime=--retime
[ "${BENCH_LATENCY_RETIME:-1}" = 0 ] && retime=
"$bin" produce --brokers "$brokers" --topic "$topic" --rate "$half" --limit "$extra" $retime "$dir/events.jsonl"
target=$(( count + extra ))
while [ "$consumed" -lt "$target" ]; do
  sleep 0.5
  consumed=$({ curl -s "127.0.0.1:$port/metrics" || true; } | awk -v t="$topic" '$1 ~ "^waymark_events_consumed_total" && index($1, "topic=\"" t "\"") {s += $2} END {printf "%d", s}')
done
sleep 1
kill $sampler 2>/dev/null || true
snapshot > "$dir/lat-after.txt"
join "$dir/lat-before.txt" "$dir/lat-after.txt" | awk '
  { le[NR] = $1; c[NR] = $3 - $2; n = NR }
  END {
    total = c[n];
    split("0.5 0.99", qs, " ");
    for (qi = 1; qi <= 2; qi++) {
      q = qs[qi]; rank = q * total; prev = 0; lo = 0;
      for (i = 1; i <= n; i++) {
        if (c[i] >= rank) {
          hi = (le[i] == "+Inf") ? lo : le[i];
          v = (c[i] == prev) ? hi : lo + (hi - lo) * (rank - prev) / (c[i] - prev);
          printf "latency p%s: %.1f ms\n", q * 100, v * 1000; break
        }
        prev = c[i]; lo = le[i]
      }
    }
  }'
# The median over the phase of each client percentile (seconds -> ms).
sed 's/^waymark_client_latency_seconds//' "$dir/client-latency.txt" | sort -k1,1 -k2,2g | awk '
  function out() { printf "client latency %s: median %.1f ms over %d samples\n", prev, a[int((n + 1) / 2)] * 1000, n }
  $1 != prev { if (prev != "") out(); prev = $1; n = 0 }
  { a[++n] = $2 }
  END { if (prev != "") out() }'
# SIGTERM to waymark itself (the child of /usr/bin/time), so time reports its peak RSS.
pkill -TERM -P $pid || true
wait $pid || true
echo "peak RSS: $(awk '/Maximum resident/ {printf "%.0f MiB", $6/1024}' "$dir/time.txt")"
