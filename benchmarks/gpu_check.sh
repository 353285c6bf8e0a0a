#!/usr/bin/env bash
# The device call, in one line: run(command="bash benchmarks/gpu_check.sh", timeout_s=540). Writes $OUT/gpu_check.json,
# $OUT/gpu_check.log (this output), $OUT/gpu_check_steps.log (each step's own) and $OUT/junit.xml.
set -o pipefail; cd "$(dirname "$0")/.." && mkdir -p "${OUT:=/tmp/gpu_check}" && PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
