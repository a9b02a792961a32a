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
# shellcheck source=scripts/bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
bench_setup startup 200000 100000 9471
rm -rf "$dir/state"
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
# With several processing threads /readyz waits for every thread's assignment; a thread that
# joins late may get it only after the others have done the work: "not yet".
printf "ready after %s; all consumed after %.2f s; all committed after %.2f s: %.0f events/s (Quix Streams: ~37 s, 5.4k events/s)\n" \
  "$( [ -n "$ready" ] && printf "%.2f s" "$ready" || echo "not yet")" "${consumed_at:-0}" "$total" "$(echo "$count / $total" | bc -l)"
