#!/usr/bin/env bash
# bench-replay: 1M events, 100k users, 10 journeys (about 30% of events touch a journey, half of
# those waits or goals of live sessions) through `waymark replay --state`. Prints events/s and
# peak RSS. BENCH_CONTROLS=1: the same events through the same journeys with every journey control
# of contract section 5 on (re-entry, exit criteria, branched waits, experiments, holdout, quiet
# hours, frequency caps).
set -euo pipefail
bin=${1:?usage: bench-replay.sh WAYMARK_BINARY}
dir=${BENCH_DIR:-$HOME/.cache/waymark-bench}
mkdir -p "$dir"
if [ ! -s "$dir/events-1m.jsonl" ]; then
  "$bin" loadgen --journeys "$dir/journeys" --events "$dir/events-1m.jsonl" --count 1000000 --users 100000
fi
journeys="$dir/journeys"
if [ "${BENCH_CONTROLS:-0}" = 1 ]; then
  journeys="$dir/journeys-controls"
  "$bin" loadgen --controls --journeys "$journeys" --events /dev/null --count 0
fi
rm -rf "$dir/state"
/usr/bin/time -v "$bin" replay --journeys "$journeys" --events "$dir/events-1m.jsonl" \
  --state "$dir/state" --stats > "$dir/records.jsonl" 2> "$dir/time.txt"
grep -E '^replay:' "$dir/time.txt"
echo "peak RSS: $(awk '/Maximum resident/ {printf "%.0f MiB", $6/1024}' "$dir/time.txt")"
echo "records: $(wc -l < "$dir/records.jsonl")"
