#!/usr/bin/env bash
# Starts or stops the local test broker: tansu 0.6.0 (Apache-Kafka-compatible) on sqlite storage.
# Usage: scripts/broker.sh start|stop|status [PORT]   (PORT default 9092; data in .run/)
# Production runs beside Apache Kafka or Redpanda; tansu is only for tests and the demo.
set -euo pipefail
cmd=${1:-start}
port=${2:-${BROKER_PORT:-9092}}
root=$(cd "$(dirname "$0")/.." && pwd)
run="$root/.run"
pidfile="$run/tansu-$port.pid"
mkdir -p "$run"

install_tansu() {
  if command -v tansu >/dev/null 2>&1 && tansu --help 2>/dev/null | grep -q libsql; then
    return
  fi
  # Only the sqlite (libsql) storage the tests and the demo use: no object-store backends.
  echo "installing tansu 0.6.0 with sqlite storage (measured: 18 minutes on 2 cores, once)..." >&2
  cargo install tansu --version 0.6.0 --locked --features libsql >&2
}

ready() {
  tansu topic list --broker "tcp://127.0.0.1:$port" >/dev/null 2>&1
}

case "$cmd" in
  start)
    install_tansu
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && ready; then
      echo "broker already running on 127.0.0.1:$port (pid $(cat "$pidfile"))"
      exit 0
    fi
    if ready; then
      echo "a broker already answers on 127.0.0.1:$port; using it"
      exit 0
    fi
    (
      cd "$run"
      # `&` on the command alone, so $! is tansu's own pid.
      nohup tansu broker \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine "sqlite://tansu-$port.db" > "tansu-$port.log" 2>&1 &
      echo $! > "$pidfile"
    )
    for _ in $(seq 1 150); do
      if ready; then
        echo "broker ready on 127.0.0.1:$port (pid $(cat "$pidfile"), log $run/tansu-$port.log)"
        exit 0
      fi
      sleep 0.2
    done
    echo "broker did not become ready; see $run/tansu-$port.log" >&2
    tail -20 "$run/tansu-$port.log" >&2 || true
    exit 1
    ;;
  stop)
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$pidfile"
      echo "broker on port $port stopped"
    else
      echo "no broker started by this script on port $port"
    fi
    ;;
  status)
    if ready; then echo "up on 127.0.0.1:$port"; else echo "down on 127.0.0.1:$port"; exit 1; fi
    ;;
  *)
    echo "usage: $0 start|stop|status [PORT]" >&2
    exit 2
    ;;
esac
