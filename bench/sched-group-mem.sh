#!/bin/bash
# What a scheduling group costs the kernel: unreclaimable slab (SUnreclaim) taken by N cgroups
# of a hierarchy, and by N processes in sessions of their own (each setsid makes an autogroup)
# against N in the shell's session. Root; a cgroup v1 `cpu` or `pids` hierarchy, or any cgroup
# v2 directory, as DIR.
#   bench/sched-group-mem.sh cgroups DIR [N]    N empty cgroups made in DIR/sgm-test
#   bench/sched-group-mem.sh sessions [N]       N `sleep`s with and without `setsid`
set -eu
slab() { awk '/^SUnreclaim:/ { print $2 }' /proc/meminfo; }
what=$1; shift
case $what in
  cgroups)
    dir=$1/sgm-test; n=${2:-2000}
    mkdir "$dir"; before=$(slab)
    for i in $(seq 1 "$n"); do mkdir "$dir/c-$i"; done
    after=$(slab)
    for i in $(seq 1 "$n"); do rmdir "$dir/c-$i"; done; rmdir "$dir"
    echo "$n cgroups in $1: +$(( after - before )) kB SUnreclaim ($(( (after - before) * 1024 / n )) bytes each)" ;;
  sessions)
    n=${1:-2000}
    for mode in plain setsid; do
      before=$(slab); pids=()
      for i in $(seq 1 "$n"); do
        if [ $mode = setsid ]; then setsid sleep 1000 & else sleep 1000 & fi
        pids+=($!)
      done
      sleep 2; after=$(slab)
      kill "${pids[@]}"; wait 2> /dev/null || true; sleep 2
      echo "$n sleeps, $mode: +$(( after - before )) kB SUnreclaim"
    done ;;
esac
