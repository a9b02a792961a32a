#!/usr/bin/env bash
# bench-kafka-profiles (issue 11): `waymark run` through the broker with and without profiles, each
# as a share of a consume-only pass over the same topic, in one sitting.
#  1. P profiles (default 1M) are produced to a profile topic and one `waymark run` applies them to a
#     fresh state (load rate printed), then stops;
#  2. N events (default 400k; 1M users, all of them with a profile) are produced to the input topic;
#     a consume-only pass reads them (`waymark tail`);
#  3. without profiles: `waymark run` from offset 0 with the plain journeys, on an empty state;
#  4. with profiles: `waymark run` on the state of step 1 (same group: the profile topic is not read
#     again) with journeys whose entries and goals read the profile.
# Each run is timed from its start until every input record is consumed (as bench-kafka does).
set -euo pipefail
bin=${1:?usage: bench-kafka-profiles.sh WAYMARK_BINARY [BROKERS]}
brokers=${2:-127.0.0.1:9092}
count=${BENCH_EVENTS:-400000}
users=${BENCH_USERS:-1000000}
profiles=${BENCH_PROFILES:-1000000}
dir=${BENCH_DIR:-$HOME/.cache/waymark-bench}/kafka-profiles-$count
mkdir -p "$dir"
if [ ! -s "$dir/events.jsonl" ]; then
  "$bin" loadgen --journeys "$dir/journeys" --events "$dir/events.jsonl" --count "$count" --users "$users"
fi
if [ ! -s "$dir/profiles.jsonl" ]; then
  "$bin" loadgen --journeys "$dir/journeys-profile" --events /dev/null --count 0 \
    --profiles "$dir/profiles.jsonl" --profile-users "$profiles"
fi
suffix=$(date +%s)
topic="benchp-events-$suffix"
ptopic="benchp-profiles-$suffix"
export WAYMARK_KAFKA_INPUT_TOPICS="$topic" WAYMARK_KAFKA_PARTITIONS=8
export WAYMARK_TOPICS_ENTRIES="benchp-entries-$suffix" WAYMARK_TOPICS_STEPS="benchp-steps-$suffix"
export WAYMARK_TOPICS_CONVERSIONS="benchp-conv-$suffix" WAYMARK_TOPICS_DLQ="benchp-dlq-$suffix"
port=9471
metric() { # the sum of a counter's series whose labels contain $2 (or all)
  { curl -s "127.0.0.1:$port/metrics" || true; } | awk -v m="$1" -v l="${2:-}" \
    'index($1, m) == 1 && (l == "" || index($1, l)) {s += $2} END {printf "%d", s}'
}
start() { # journeys state group log (each group its own changelog and route topics)
  WAYMARK_TOPICS_CHANGELOG="$3-changelog" WAYMARK_TOPICS_ROUTE="$3-route" "$bin" run --brokers "$brokers" --group-id "$3" --journeys-dir "$1" --state-dir "$2" \
    --metrics-addr "127.0.0.1:$port" > "$4" 2>&1 &
  pid=$!
}
await() { # metric label target
  local n=0
  while [ "$n" -lt "$3" ]; do
    sleep 0.5
    n=$(metric "$1" "$2")
    kill -0 $pid 2>/dev/null || { echo "waymark exited early"; exit 1; }
  done
}
stop() { kill -TERM $pid; wait $pid || true; }

rm -rf "$dir/state-base" "$dir/state-prof" "$dir/state-setup"
# Create the topics (waymark does so at start), then stop it before producing.
WAYMARK_KAFKA_PROFILE_TOPICS="$ptopic" start "$dir/journeys-profile" "$dir/state-setup" "benchp-setup-$suffix" "$dir/setup.log"
for _ in $(seq 1 100); do curl -sf "127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
stop

echo "producing $profiles profiles to $ptopic..."
"$bin" produce --brokers "$brokers" --topic "$ptopic" "$dir/profiles.jsonl"
echo "loading them into a fresh state..."
t0=$(date +%s.%N)
# Smaller batches for the load only: 50k profile changes at once are more changelog than the
# test broker acknowledges within message.timeout.ms. The timed runs below keep the defaults.
WAYMARK_PROCESSING_COMMIT_MAX_RECORDS=5000 WAYMARK_KAFKA_PROFILE_TOPICS="$ptopic" \
  start "$dir/journeys-profile" "$dir/state-prof" "benchp-prof-$suffix" "$dir/load.log"
await waymark_profile_updates_total "" "$profiles"
t1=$(date +%s.%N)
echo "profile load: $(echo "$profiles / ($t1 - $t0)" | bc) records/s (from start)"
stop
echo "state with profiles: $(du -sh "$dir/state-prof" | cut -f1)"

echo "producing $count events to $topic..."
"$bin" produce --brokers "$brokers" --topic "$topic" "$dir/events.jsonl"
echo "consume-only pass..."
t0=$(date +%s.%N)
"$bin" tail --brokers "$brokers" --count "$count" --idle 20s "$topic" > /dev/null
t1=$(date +%s.%N)
consume=$(echo "$count / ($t1 - $t0)" | bc)
echo "consume-only: $consume events/s"

timed_run() { # label journeys state group log: events/s until every event is consumed, then entries
  echo "waymark run $1..."
  local t0 t1
  t0=$(date +%s.%N)
  start "$2" "$3" "$4" "$5"
  await waymark_events_consumed_total "topic=\"$topic\"" "$count"
  t1=$(date +%s.%N)
  rate=$(echo "$count / ($t1 - $t0)" | bc)
  sleep 2
  entries=$(metric waymark_entries_total)
  stop
  echo "$1: $rate events/s ($(echo "scale=1; 100 * $rate / $consume" | bc)% of consume-only)"
}
timed_run "without profiles" "$dir/journeys" "$dir/state-base" "benchp-base-$suffix" "$dir/run-base.log"
base_entries=$entries
WAYMARK_KAFKA_PROFILE_TOPICS="$ptopic" timed_run "with $profiles profiles stored" \
  "$dir/journeys-profile" "$dir/state-prof" "benchp-prof-$suffix" "$dir/run-prof.log"
prof_entries=$entries
echo "journey entries: $base_entries without, $prof_entries with (every user's profile meets the conditions: equal)"
