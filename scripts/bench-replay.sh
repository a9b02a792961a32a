#!/usr/bin/env bash
# bench-replay: 1M events, 100k users, 10 journeys (about 30% of events touch a journey, half of
# those waits or goals of live sessions) through `waymark replay --state`. Prints events/s and
# peak RSS.
set -euo pipefail
bin=${1:?usage: bench-replay.sh WAYMARK_BINARY}
dir=${BENCH_DIR:-$HOME/.cache/waymark-bench}
mkdir -p "$dir"
if [ ! -s "$dir/events-1m.jsonl" ]; then
  "$bin" loadgen --journeys "$dir/journeys" --events "$dir/events-1m.jsonl" --count 1000000 --users 100000
fi
rm -rf "$dir/state"
/usr/bin/time -v "$bin" replay --journeys "$dir/journeys" --events "$dir/events-1m.jsonl" \
  --state "$dir/state" --stats > "$dir/records.jsonl" 2> "$dir/time.txt"
grep -E '^replay:' "$dir/time.txt"
echo "peak RSS: $(awk '/Maximum resident/ {printf "%.0f MiB", $6/1024}' "$dir/time.txt")"
echo "records: $(wc -l < "$dir/records.jsonl")"
