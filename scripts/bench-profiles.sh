#!/usr/bin/env bash
# bench-profiles (issue 11): the 1M-event replay workload (100k users, 10 journeys) twice, in one
# sitting: once as `make bench-replay` runs it, once with 1M users' profiles (~300 bytes each)
# loaded into the state first and journeys whose entry conditions and goals read the profile
# (conditions every profile meets, so both runs give the same records: checked). Prints events/s
# of each, their ratio (target >= 80%), the profile load's rate and the state's size.
set -euo pipefail
bin=${1:?usage: bench-profiles.sh WAYMARK_BINARY}
dir=${BENCH_DIR:-$HOME/.cache/waymark-bench}
profiles=${BENCH_PROFILES:-1000000}
# The decoded-state cache of both runs. Replay holds every user in one cache where `run` splits
# them across partitions (64 MiB each by default): 256 MiB is what 4 partitions would hold, and
# what 100k users with ~1.3 KB decoded profiles need not to be re-read over and over.
cache=${BENCH_CACHE_BYTES:-268435456}
mkdir -p "$dir"
if [ ! -s "$dir/events-1m.jsonl" ]; then
  "$bin" loadgen --journeys "$dir/journeys" --events "$dir/events-1m.jsonl" --count 1000000 --users 100000
fi
if [ ! -s "$dir/profiles-$profiles.jsonl" ]; then
  "$bin" loadgen --journeys "$dir/journeys-profile" --events /dev/null --count 0 \
    --profiles "$dir/profiles-$profiles.jsonl" --profile-users "$profiles"
fi
rate() { sed -n 's/.* \([0-9][0-9]*\) events\/s.*/\1/p' "$1" | tail -1; }

echo "without profiles (cache $cache bytes)..."
rm -rf "$dir/state-base"
/usr/bin/time -v "$bin" replay --journeys "$dir/journeys" --events "$dir/events-1m.jsonl" \
  --state "$dir/state-base" --cache-bytes "$cache" --stats > "$dir/records-base.jsonl" 2> "$dir/time-base.txt"
grep -E '^replay:' "$dir/time-base.txt"

echo "loading $profiles profiles..."
rm -rf "$dir/state-prof"
"$bin" replay --journeys "$dir/journeys-profile" --events "$dir/profiles-$profiles.jsonl" \
  --state "$dir/state-prof" --stats > /dev/null 2> "$dir/time-load.txt"
grep -E '^replay:' "$dir/time-load.txt"
echo "state with profiles: $(du -sh "$dir/state-prof" | cut -f1)"

echo "with profiles..."
/usr/bin/time -v "$bin" replay --journeys "$dir/journeys-profile" --events "$dir/events-1m.jsonl" \
  --state "$dir/state-prof" --cache-bytes "$cache" --stats > "$dir/records-prof.jsonl" 2> "$dir/time-prof.txt"
grep -E '^replay:' "$dir/time-prof.txt"

cmp -s "$dir/records-base.jsonl" "$dir/records-prof.jsonl" \
  && echo "records: identical ($(wc -l < "$dir/records-prof.jsonl"))" \
  || { echo "records differ between the two runs"; exit 1; }
base=$(rate "$dir/time-base.txt"); prof=$(rate "$dir/time-prof.txt")
echo "peak RSS: $(awk '/Maximum resident/ {printf "%.0f MiB", $6/1024}' "$dir/time-base.txt") without, $(awk '/Maximum resident/ {printf "%.0f MiB", $6/1024}' "$dir/time-prof.txt") with"
echo "with profiles: $prof events/s = $(echo "scale=1; 100 * $prof / $base" | bc)% of $base events/s without (target >= 80%)"
