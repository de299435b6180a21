# Shell functions shared by the bench scripts (source it).

# wait_for_workers SUP N WHAT DIR: until SUP has N pbworker children, at most 5 minutes;
# otherwise says so (WHAT names the script, DIR its scratch directory), stops SUP and exits 1.
wait_for_workers() {
  local sup=$1 n=$2 what=$3 dir=$4 deadline=$((SECONDS + 300))
  until [ "$(pgrep -c -P "$sup" -x pbworker || true)" = "$n" ]; do
    if [ $SECONDS -ge $deadline ] || ! kill -0 "$sup" 2>/dev/null; then
      echo "$what: not all $n workers running after 5 minutes, or the supervisor ended ($dir)" >&2
      kill -TERM "$sup" 2> /dev/null || true
      exit 1
    fi
    sleep 0.3
  done
}

# start_supervisor BIN N W DIR: starts, in the background, `limit` (the harness's limitsup)
# or the agent BIN with the harness adapter's site of N workers W (its files in DIR, its log
# DIR/agent.log); sets `sup` to its pid.
start_supervisor() {
  local bin=$1 n=$2 w=$3 dir=$4 here
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  if [ "$bin" = limit ]; then
    "${PB_BIN:-/tmp/peers-bench/bin}/limitsup" "$n" "$w" & sup=$!
  else
    bash "$here/hatchery.sh" config "$dir" "$n" "$w"
    "$bin" agent --config "$dir/hatchery.toml" 2> "$dir/agent.log" & sup=$!
  fi
}
