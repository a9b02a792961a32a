#!/usr/bin/env bash
# bench-backtest: the speed targets of `waymark backtest` (issue 12), measured side by side in one
# sitting. File form: the 1M-event workload of bench-replay through `replay --state` and through
# `backtest --state`, alternated, BENCH_RUNS runs each (default 3). Kafka form (when BROKERS is
# given): the same events produced to a fresh 8-partition topic, then `backtest --consume-only` (the read
# alone) and `backtest --brokers` over the same range, alternated. Prints every run and the
# medians' ratios.
set -euo pipefail
bin=${1:?usage: bench-backtest.sh WAYMARK_BINARY [BROKERS]}
brokers=${2:-}
runs=${BENCH_RUNS:-3}
dir=${BENCH_DIR:-$HOME/.cache/waymark-bench}
mkdir -p "$dir"
if [ ! -s "$dir/events-1m.jsonl" ]; then
  "$bin" loadgen --journeys "$dir/journeys" --events "$dir/events-1m.jsonl" --count 1000000 --users 100000
fi
events="$dir/events-1m.jsonl"
rate() { sed -nE 's/.* ([0-9]+) (events|records)\/s.*/\1/p' "$1" | tail -n 1; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

replay_rates=(); backtest_rates=()
[ "${BENCH_SKIP_FILE:-0}" = 1 ] && runs_file=0 || runs_file=$runs
for i in $(seq "$runs_file"); do
  rm -rf "$dir/state-r" "$dir/state-b"
  "$bin" replay --journeys "$dir/journeys" --events "$events" --state "$dir/state-r" --stats \
    > /dev/null 2> "$dir/replay.txt"
  replay_rates+=("$(rate "$dir/replay.txt")")
  "$bin" backtest --journeys "$dir/journeys" --events "$events" --stats \
    > "$dir/backtest.txt" 2> "$dir/backtest-err.txt"
  backtest_rates+=("$(rate "$dir/backtest-err.txt")")
  echo "run $i: replay ${replay_rates[-1]} events/s, backtest ${backtest_rates[-1]} events/s"
done
if [ "$runs_file" -gt 0 ]; then
r=$(printf '%s\n' "${replay_rates[@]}" | median)
b=$(printf '%s\n' "${backtest_rates[@]}" | median)
echo "file: replay median $r events/s, backtest median $b events/s: $(awk -v b="$b" -v r="$r" 'BEGIN {printf "%.0f%%", 100*b/r}') (target >= 90%)"
fi

[ -n "$brokers" ] || exit 0
suffix=$(date +%s)
topic="bench-backtest-$suffix"
# An 8-partition topic, created the way bench-kafka.sh does: waymark creates its topics at start.
export WAYMARK_KAFKA_INPUT_TOPICS="$topic" WAYMARK_KAFKA_PARTITIONS=8
for t in ENTRIES STEPS CONVERSIONS DLQ ROUTE CHANGELOG; do
  export "WAYMARK_TOPICS_$t=bench-bt-$(echo "$t" | tr 'A-Z' 'a-z')-$suffix"
done
port=9471
rm -rf "$dir/setup-state"
"$bin" run --brokers "$brokers" --group-id "bench-bt-setup-$suffix" --journeys-dir "$dir/journeys" \
  --state-dir "$dir/setup-state" --metrics-addr "127.0.0.1:$port" > "$dir/setup.log" 2>&1 &
pid=$!
for _ in $(seq 1 150); do curl -sf "127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
kill -TERM $pid; wait $pid || true
from=$(date -u +%Y-%m-%dT%H:%M:%SZ)
sleep 1
"$bin" produce --brokers "$brokers" --topic "$topic" "$events" > /dev/null
sleep 1
to=$(date -u -d '+1 second' +%Y-%m-%dT%H:%M:%SZ)
consume_rates=(); kafka_rates=()
for i in $(seq "$runs"); do
  "$bin" backtest --journeys "$dir/journeys" --brokers "$brokers" --topics "$topic" \
    --from "$from" --to "$to" --consume-only > "$dir/consume.txt"
  consume_rates+=("$(rate "$dir/consume.txt")")
  "$bin" backtest --journeys "$dir/journeys" --brokers "$brokers" --topics "$topic" \
    --from "$from" --to "$to" --stats > /dev/null 2> "$dir/kafka-err.txt"
  kafka_rates+=("$(rate "$dir/kafka-err.txt")")
  echo "run $i: consume only ${consume_rates[-1]} records/s ($(head -c 80 "$dir/consume.txt")...), backtest ${kafka_rates[-1]} events/s"
done
c=$(printf '%s\n' "${consume_rates[@]}" | median)
k=$(printf '%s\n' "${kafka_rates[@]}" | median)
echo "kafka: consume-only median $c records/s, backtest median $k events/s: $(awk -v k="$k" -v c="$c" 'BEGIN {printf "%.0f%%", 100*k/c}') (target >= 80%)"
