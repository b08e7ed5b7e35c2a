#!/usr/bin/env bash
# Every hot-path target measured in one run on one host (README: Performance): the
# targets table (no-op against the pure-Python floor and vLLM's queue, small arguments
# against the no-op, worker CPU with calls 5 ms apart), where a call's time goes (no-op
# and small arguments), this tree against a baseline package, A/B, and the CUDA tests.
#
#   benchmarks/targets_pass.sh OUT VLLM_SHM_DIR BASELINE_DIR [SIZES]
#
# OUT: a directory for the results (made); VLLM_SHM_DIR: vLLM's shared-memory queue
# copied out of a vLLM install (benchmarks/copy_vllm_shm.py); BASELINE_DIR: a directory
# holding the baseline's gpuexec package, built; SIZES: world sizes (default 1,2,4,8).
# PYTHON picks the interpreter (default python3). Each step's output goes to its own
# file under OUT; a step that fails is reported and the others still run. The targets
# come first, the CUDA tests last, so that a pass cut short by a time limit keeps them.
set -u
if [ $# -lt 3 ]; then
    sed -n '2,14p' "$0"
    exit 2
fi
out=$1 vllm=$2 base=$3 sizes=${4:-1,2,4,8}
py=${PYTHON:-python3}
mkdir -p "$out/noop" "$out/small" || exit 1
status=0
step() {  # step NAME COMMAND...: run it, its output into OUT/NAME.txt
    local name=$1
    shift
    echo "== $name: $*"
    "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    tail -n 1 "$out/$name.txt"
    if [ $rc -ne 0 ]; then
        echo "!! $name exited with $rc"
        status=1
    fi
}
step hot_path "$py" benchmarks/hot_path.py --sizes "$sizes" --calls 4000 \
    --vllm-path "$vllm" --out "$out"
step call_anatomy "$py" benchmarks/call_anatomy.py --sizes 1,2,8 --calls 20000 \
    --out "$out/noop"
step call_anatomy_small "$py" benchmarks/call_anatomy.py --call small --sizes 1,2,8 \
    --calls 20000 --out "$out/small"
step ab_rpc "$py" benchmarks/ab_rpc.py --baseline-dir "$base" --rounds 6 --restart-every 2 \
    --sizes "$sizes" --spaced-rounds 2 --transports shm --out "$out"
step cuda "$py" -m pytest -m cuda -q -p no:cacheprovider
exit $status
