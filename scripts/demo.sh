#!/usr/bin/env bash
# The main job end to end: a fresh group and state, `waymark run` on config/journeys, the seed
# scenario's events produced to `events`, the output records printed readably, everything stopped.
set -euo pipefail
brokers=${1:-127.0.0.1:9092}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${WAYMARK_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/waymark-target}/release/waymark}
# Not a setting: `waymark run` refuses WAYMARK_* variables it does not know, so it must not see it.
unset WAYMARK_BIN
cd "$root"
run=.run/demo-$(date +%s)
mkdir -p "$run"
suffix=$(date +%s)
export WAYMARK_KAFKA_INPUT_TOPICS="demo-events-$suffix"
export WAYMARK_TOPICS_ENTRIES="demo-entries-$suffix" WAYMARK_TOPICS_STEPS="demo-steps-$suffix"
export WAYMARK_TOPICS_CONVERSIONS="demo-conversions-$suffix" WAYMARK_TOPICS_DLQ="demo-dlq-$suffix"
export WAYMARK_TOPICS_ROUTE="demo-route-$suffix" WAYMARK_TOPICS_CHANGELOG="demo-changelog-$suffix"
# The scenario is retimed to start now and spans four days of event time: let its later events in
# (processing.max_future_ms would otherwise send events over a day ahead to the dead-letter topic).
export WAYMARK_PROCESSING_MAX_FUTURE_MS=$((7 * 86400000))
started=$(date -u -d '-1 minute' +%Y-%m-%dT%H:%M:%SZ)
echo "== validating the journeys"
"$bin" validate config/journeys
echo "== starting waymark run (state in $run/state, log in $run/waymark.log)"
"$bin" run --brokers "$brokers" --group-id "demo-$suffix" --state-dir "$run/state" > "$run/waymark.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -sf 127.0.0.1:9464/readyz >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { echo "waymark run exited:"; cat "$run/waymark.log"; exit 1; }
  sleep 0.2
done
echo "== producing the seed scenario (config/scenario/seed-events.jsonl) to $WAYMARK_KAFKA_INPUT_TOPICS"
# Four events a second, as live traffic: an entry routed to another partition (the gift's
# recipient, invited users) has landed before that user's own next event. --retime moves the
# scenario so its first event is now: its timers then fire by event time, as in the story, instead
# of all at once on the wall clock (which is past the scenario's dates).
"$bin" produce --brokers "$brokers" --topic "$WAYMARK_KAFKA_INPUT_TOPICS" --rate 4 --retime config/scenario/seed-events.jsonl
sleep 3
echo "== output records (entries, steps, conversions), in event-time order"
"$bin" tail --brokers "$brokers" --idle 3s --format pretty \
  "$WAYMARK_TOPICS_ENTRIES" "$WAYMARK_TOPICS_STEPS" "$WAYMARK_TOPICS_CONVERSIONS" \
  | awk '{ r = ($2 == "ENTER") ? 0 : ($2 == "EXIT") ? 2 : 1; print $1 " " r "\t" $0 }' \
  | sort -s -k1,2 | cut -f2-
echo "== metrics (excerpt)"
curl -s 127.0.0.1:9464/metrics | grep -E '^waymark_(entries_total|conversions_total|entries_refused_total)' || true
echo "== journey controls (contract section 5): config/scenario/controls-events.jsonl through 'waymark replay'"
echo "   re-entry, exit criteria, a branched wait, an experiment, quiet hours in the user's zone, a frequency cap"
"$bin" replay --pretty --journeys config/journeys --events config/scenario/controls-events.jsonl --until 2026-12-05T00:00:00Z
echo "== backtest straight from Kafka: the journeys over this demo's events topic (read only; page in $run/backtest.html)"
"$bin" backtest --journeys config/journeys --brokers "$brokers" --topics "$WAYMARK_KAFKA_INPUT_TOPICS" \
  --from "$started" --to "$(date -u -d '+1 minute' +%Y-%m-%dT%H:%M:%SZ)" --html "$run/backtest.html"
echo "== stopping waymark (SIGTERM)"
kill -TERM $pid
wait $pid && echo "waymark exited 0"
trap - EXIT
