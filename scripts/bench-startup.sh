#!/usr/bin/env bash
# bench-startup: the start-up measure of issue 13. Pre-produces N events (default 200k; 100k
# users, 10 journeys) into an 8-partition topic, then times one `waymark run` of a fresh group
# and state directory from the process start until every input's effects are durable: the sum
# of `waymark_committed_offset` over the topic's partitions reaches N (outputs acknowledged,
# state written). Also prints when the instance was ready (partitions assigned and restored) and
# when everything was consumed. Compare: a Quix Streams implementation of the same journeys on
# the same broker took ~37 s for 200k events (issue 13).
set -euo pipefail
bin=${1:?usage: bench-startup.sh WAYMARK_BINARY [BROKERS]}
brokers=${2:-127.0.0.1:9092}
count=${BENCH_EVENTS:-200000}
users=${BENCH_USERS:-100000}
dir=${BENCH_DIR:-$HOME/.cache/waymark-bench}/startup-$count
mkdir -p "$dir"
suffix=$(date +%s)
topic="startup-events-$suffix"
if [ ! -s "$dir/events.jsonl" ]; then
  "$bin" loadgen --journeys "$dir/journeys" --events "$dir/events.jsonl" --count "$count" --users "$users"
fi
export WAYMARK_KAFKA_INPUT_TOPICS="$topic" WAYMARK_KAFKA_PARTITIONS=8
export WAYMARK_TOPICS_ENTRIES="startup-entries-$suffix" WAYMARK_TOPICS_STEPS="startup-steps-$suffix"
export WAYMARK_TOPICS_CONVERSIONS="startup-conv-$suffix" WAYMARK_TOPICS_DLQ="startup-dlq-$suffix"
export WAYMARK_TOPICS_ROUTE="startup-route-$suffix"
export WAYMARK_TOPICS_CHANGELOG="startup-changelog-$suffix"
port=9471
rm -rf "$dir/setup-state" "$dir/state"
# Create the topics (waymark does so at start), then stop it before producing. Without the
# changelog: its claims would carry this setup group's name, which the measured group refuses.
WAYMARK_STATE_CHANGELOG=false "$bin" run --brokers "$brokers" --group-id "startup-setup-$suffix" --journeys-dir "$dir/journeys" \
  --state-dir "$dir/setup-state" --metrics-addr "127.0.0.1:$port" > "$dir/setup.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do curl -sf "127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
kill -TERM $pid 2>/dev/null || true; wait $pid || true
echo "producing $count events to $topic..."
"$bin" produce --brokers "$brokers" --topic "$topic" "$dir/events.jsonl" > /dev/null

sum() { curl -s "127.0.0.1:$port/metrics" | awk -v m="$1" -v t="$topic" '$1 ~ "^" m && index($1, "topic=\"" t "\"") {s += $2} END {printf "%d", s}'; }
echo "waymark run from offset 0..."
t0=$(date +%s.%N)
"$bin" run --brokers "$brokers" --group-id "startup-$suffix" --journeys-dir "$dir/journeys" \
  --state-dir "$dir/state" --metrics-addr "127.0.0.1:$port" > "$dir/run.log" 2>&1 &
pid=$!
ready=""
consumed_at=""
while :; do
  sleep 0.1
  kill -0 $pid 2>/dev/null || { echo "waymark exited early"; tail "$dir/run.log"; exit 1; }
  now=$(date +%s.%N)
  if [ -z "$ready" ] && curl -sf "127.0.0.1:$port/readyz" >/dev/null 2>&1; then ready=$(echo "$now - $t0" | bc); fi
  if [ -z "$consumed_at" ] && [ "$(sum waymark_events_consumed_total)" -ge "$count" ]; then consumed_at=$(echo "$now - $t0" | bc); fi
  [ "$(sum waymark_committed_offset)" -ge "$count" ] && break
done
t1=$(date +%s.%N)
total=$(echo "$t1 - $t0" | bc)
kill -TERM $pid 2>/dev/null || true; wait $pid || true
printf "ready after %.2f s; all consumed after %.2f s; all committed after %.2f s: %.0f events/s (Quix Streams: ~37 s, 5.4k events/s)\n" \
  "${ready:-0}" "${consumed_at:-0}" "$total" "$(echo "$count / $total" | bc -l)"
