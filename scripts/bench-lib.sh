# Shared by the Kafka benchmarks (sourced, not run). bench_setup NAME DEFAULT_COUNT DEFAULT_USERS
# PORT [DIRNAME]: topics are named NAME-..., the cache directory DIRNAME-COUNT (default NAME). Sets bin/brokers (from $1/$2 of the caller, passed as BIN BROKERS), count, users, dir,
# suffix, topic and port; generates the load once (`waymark loadgen`, cached in $dir); points
# every topic of waymark at names of its own for this run; and creates them with one short
# `waymark run` (without the changelog: its claims would carry the setup group's name, which the
# measured group refuses), stopped before the events are produced.
bench_setup() {
  local name=$1 default_count=$2 default_users=$3
  port=$4
  local dirname=${5:-$name}
  count=${BENCH_EVENTS:-$default_count}
  users=${BENCH_USERS:-$default_users}
  dir=${BENCH_DIR:-$HOME/.cache/waymark-bench}/$dirname-$count
  mkdir -p "$dir"
  suffix=$(date +%s)
  topic="$name-events-$suffix"
  if [ ! -s "$dir/events.jsonl" ]; then
    "$bin" loadgen --journeys "$dir/journeys" --events "$dir/events.jsonl" --count "$count" --users "$users"
  fi
  export WAYMARK_KAFKA_INPUT_TOPICS="$topic" WAYMARK_KAFKA_PARTITIONS=8
  export WAYMARK_TOPICS_ENTRIES="$name-entries-$suffix" WAYMARK_TOPICS_STEPS="$name-steps-$suffix"
  export WAYMARK_TOPICS_CONVERSIONS="$name-conv-$suffix" WAYMARK_TOPICS_DLQ="$name-dlq-$suffix"
  export WAYMARK_TOPICS_ROUTE="$name-route-$suffix"
  export WAYMARK_TOPICS_CHANGELOG="$name-changelog-$suffix"
  rm -rf "$dir/setup-state"
  WAYMARK_STATE_CHANGELOG=false "$bin" run --brokers "$brokers" --group-id "$name-setup-$suffix" \
    --journeys-dir "$dir/journeys" --state-dir "$dir/setup-state" --metrics-addr "127.0.0.1:$port" \
    > "$dir/setup.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do curl -sf "127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
  kill -TERM $pid 2>/dev/null || true
  wait $pid || true
}

# CPU seconds (user + system) a process has used so far; 0 if it is gone or unknown.
cpu_seconds() {
  local pid=$1
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || { echo 0; return; }
  # Fields 14 and 15 after the command name (which may hold spaces, so cut at its ')').
  sed 's/.*) //' "/proc/$pid/stat" | awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($12 + $13) / hz}'
}

# The pid of the broker listening on $brokers' port, if it runs on this machine.
broker_pid() {
  local port=${brokers##*:}
  ss -ltnpH "sport = :$port" 2>/dev/null | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1
}
