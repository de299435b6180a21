#!/bin/bash
# Adapter "limitleaf-sid" for ../shared/bench/bench.py: bench/limitleaf.sh (limitsup with a
# cgroup leaf per start) whose children also call setsid(), as Hatchery's workers did until
# 2026-12-07: each a session of its own, and so, where the scheduler's autogroups apply (no cpu controller over
# the worker), a scheduling group of its own.
set -eu
export LIMITLEAF_SETSID=1
if [ "$1" = settings ]; then
  echo "limitleaf (limitsup plus one cgroup leaf per start), each child calling setsid() before its execv; stop = SIGTERM to limitleaf"
  exit 0
fi
exec bash "$(dirname "$0")/limitleaf.sh" "$@"
