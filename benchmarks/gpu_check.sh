#!/usr/bin/env bash
# One-shot GPU check (issue 8): run from the repository root on a machine with CUDA.
#
#   OUT=gpu_check_out BUDGET_S=520 bash benchmarks/gpu_check.sh
#
# Everything it prints also goes to $OUT/gpu_check.log; the full pytest output, the training logs
# and the profiles go to their own files in $OUT (six files in all). Steps, most important
# first, each with its own time limit, cut to what is left of BUDGET_S (seconds, default 520),
# so that a slow step cannot eat the others' time:
#   1. every real-Caffe layer case in GPU mode (contiguous and channels_last), the 17 solver
#      trajectories in GPU mode, 2 processes (gloo over CUDA tensors) = iter_size 2 in GPU mode,
#      the CUDA-only tests (the CUDA-graph ones included);
#   2. tools/train.py --gpu 0 on the `caffe train` fixture (float32, then --channels_last), its
#      snapshot against Caffe's;
#   3. the AlexNet benchmark in float32 (IEEE, TF32 off) with the peak CUDA allocation, then at
#      batches 1-10 with the same host reads on both sides (--host_reads both, session 9), AlexNet
#      trained through CUDA graphs against eager (cuda_graph_probe.py) and their speed against the
#      hand-written model eager and graphed (bench_alexnet.py --cuda_graph, session 10), the
#      iteration with the solver's loss read at once (before session 6), the interpreter's
#      per-call overhead on a tiny AlexNet (bench_overhead.py; host time by Python function in
#      $OUT/host_profile.log; ablate_overhead.py: one layer kind at a time replaced by torch's
#      own operation), the LRN's window sums by shifted slices (to compare with the
#      default reduction); with FULL=1 also bf16 + channels_last, inference through net.run and
#      the iteration without the label check's host sync (measured in session 4);
#      torch.profiler summaries of one call per side ($OUT/profile.log), and last (least
#      important, slowest) the opt-in torch.compile with CUDA graphs at batches 1 and 10;
#   4. with two or more GPUs: tools/train.py --gpu all (NCCL), snapshots written once.
# A folder .whl/ of wheels (e.g. protobuf, lmdb for the machine's Python) is installed first
# when present, for machines that cannot reach a package index.
set -u
OUT=${OUT:-gpu_check_out}
BUDGET_S=${BUDGET_S:-520}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: only to try the script's plumbing on a machine without CUDA
LOG="$OUT/gpu_check.log"
: > "$LOG"
R=$PWD
export PYTHONUNBUFFERED=1 PYTHONPATH=$R
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$R
fi

say() { echo "$@" | tee -a "$LOG"; }
# limit CAP: CAP seconds, or what is left of the budget less a 10 s margin (at least 5)
limit() {
    local left=$((BUDGET_S - SECONDS - 10))
    [ "$left" -lt 5 ] && left=5
    [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
bench() {  # bench CAP args...: bench_alexnet.py under a time limit, into the log
    local cap=$1
    shift
    timeout "$(limit "$cap")" python3 benchmarks/bench_alexnet.py --device "$DEVICE" "$@" 2>&1 | grep -v '^USDT' | tee -a "$LOG"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())" \
    2>&1 | tee -a "$LOG"

say "== 1. conformance in GPU mode (layers, solver trajectories, CUDA-only tests) [${SECONDS}s]"
CAFFE_COMPAT_TEST_GPU=1 timeout "$(limit 240)" python3 -m pytest -q -p no:cacheprovider -rf --tb=short --durations=12 \
    tests/test_conformance_layers.py tests/test_layers_loss.py tests/test_host_mirror.py tests/test_solvers.py \
    tests/test_distributed.py tests/test_speed_options.py tests/test_layers_cuda.py tests/test_cuda_graph.py \
    > "$OUT/gpu_conformance.log" 2>&1
echo "pytest rc=$?" >> "$OUT/gpu_conformance.log"
grep -E '^(FAILED|ERROR)' "$OUT/gpu_conformance.log" | head -20 | tee -a "$LOG"
tail -2 "$OUT/gpu_conformance.log" | tee -a "$LOG"

for FLAGS in "" "--channels_last"; do
    say "== 2. tools/train.py --gpu 0 $FLAGS against Caffe's snapshot [${SECONDS}s]"
    W=$(mktemp -d)
    cp -r tests/fixtures/caffe_reference/cli/train_test_snapshot/. "$W/" && rm -f "$W"/snap_iter_*
    # shellcheck disable=SC2086  # FLAGS: zero or one word
    (cd "$W" && timeout "$(limit 90)" python3 "$R/tools/train.py" --solver solver.prototxt --weights init.caffemodel \
        --gpu 0 $FLAGS > "$OUT/gpu_train${FLAGS:+_cl}.log" 2>&1; echo "train rc=$?") | tee -a "$LOG"
    timeout "$(limit 30)" python3 - "$W" <<'EOF' 2>&1 | tee -a "$LOG"
import sys
import numpy as np
from caffe_compat import io as cio
ours = cio.read_caffemodel(f"{sys.argv[1]}/snap_iter_8.caffemodel")
ref = cio.read_caffemodel("tests/fixtures/caffe_reference/cli/train_test_snapshot/snap_iter_8.caffemodel")
worst = 0.0
for a, b in zip(ours.layer, ref.layer):
    for x, y in zip(a.blobs, b.blobs):
        worst = max(worst, float(np.max(np.abs(cio.blob_to_array(x) - cio.blob_to_array(y)))))
print(f"snap_iter_8 max abs difference from Caffe's: {worst:.3g}")
EOF
done

say "== 3a. AlexNet float32, peak CUDA allocation [${SECONDS}s]"
# session 8: SGD's whole-tensor update goes through torch._fused_sgd_ only where it is bit-identical here
timeout "$(limit 30)" python3 -c "import torch; from caffe_compat.solvers import update_engine; \
print('torch._fused_sgd_ bit-identical to the foreach SGD update on this GPU (used if so):', \
update_engine.fused_sgd_matches(torch.device('$DEVICE', 0) if '$DEVICE' == 'cuda' else torch.device('cpu'), whole=True))" \
    2>&1 | tee -a "$LOG"
bench 150 --batches 1,10,64,128 --reps 5 --iters 20 --memory
say "== 3a0. batches 1-10, both sides reading the same results back (--host_reads both; session 9) [${SECONDS}s]"
bench 75 --batches 1,4,10 --reps 9 --iters 30 --host_reads both
say "== 3a1. CUDA graphs (session 10): AlexNet trained graphed against eager, then the speed at batches 1-10 [${SECONDS}s]"
timeout "$(limit 90)" python3 benchmarks/cuda_graph_probe.py --batches 4,10 --iters 6 2>&1 | grep -v '^USDT' | tee -a "$LOG"
bench 75 --batches 1,4,10 --reps 7 --iters 30 --what fwd_bwd,iter --host_reads both --cuda_graph
bench 75 --batches 1,4,10 --reps 7 --iters 30 --what fwd_bwd,iter --host_reads both --cuda_graph --baseline_same
say "== 3a2. the iteration with the loss read at once (the host waits for the device each iteration; compare with 3a) [${SECONDS}s]"
bench 60 --batches 1,10,64 --reps 5 --iters 20 --what iter --loss_read now
say "== 3a3. the update through foreach operations, not SGD's fused kernel (before session 8; compare with 3a) [${SECONDS}s]"
bench 45 --batches 1,10 --reps 5 --iters 20 --what iter --fused_update chunked
say "== 3b. per-call overhead, tiny AlexNet (loss read late, then at once; host time by function) [${SECONDS}s]"
timeout "$(limit 40)" python3 benchmarks/bench_overhead.py --device "$DEVICE" --reps 5 2>&1 | grep -v '^USDT' | tee -a "$LOG"
timeout "$(limit 40)" python3 benchmarks/bench_overhead.py --device "$DEVICE" --reps 5 --loss_read now 2>&1 | grep -v '^USDT' | tee -a "$LOG"
timeout "$(limit 40)" python3 benchmarks/bench_overhead.py --device "$DEVICE" --reps 5 --host_reads both --cuda_graph 2>&1 | grep -v '^USDT' | tee -a "$LOG"
timeout "$(limit 60)" python3 benchmarks/bench_overhead.py --device "$DEVICE" --reps 1 --cprofile 30 > "$OUT/host_profile.log" 2>&1
say "== 3b2. where the host time goes: our layers one at a time replaced by torch's own [${SECONDS}s]"
timeout "$(limit 45)" python3 benchmarks/ablate_overhead.py --device "$DEVICE" --reps 3 --calls 100 2>&1 | grep -v '^USDT' | tee -a "$LOG"
say "== 3e2. the LRN's window sums by shifted slices (the GPU path before session 5; compare with 3a) [${SECONDS}s]"
bench 60 --batches 1,10,64 --reps 3 --what fwd_bwd --lrn_window slices
if [ "${FULL:-0}" = 1 ]; then  # measured in session 4 (docs/gpu_runs/): FULL=1 to repeat
    say "== 3c. bf16 + channels_last, both sides [${SECONDS}s]"
    bench 90 --batches 64,128 --reps 3 --precision bf16 --channels_last --baseline_same --what fwd_bwd,iter
    say "== 3c2. bf16 + channels_last, both sides in CUDA graphs (session 10) [${SECONDS}s]"
    bench 90 --batches 1,10,64 --reps 3 --precision bf16 --channels_last --baseline_same --cuda_graph --what fwd_bwd,iter --host_reads both
    say "== 3d. inference through net.run (tensors out) [${SECONDS}s]"
    bench 60 --batches 1,10,64 --reps 3 --what fwd --fwd_api run
    say "== 3e. iteration without the label check's host sync [${SECONDS}s]"
    bench 60 --batches 1,10,64 --reps 3 --what iter --no_label_check
fi
say "== 3f. profiles (summaries here, tables in profile.log) [${SECONDS}s]"
timeout "$(limit 90)" python3 benchmarks/bench_alexnet.py --device "$DEVICE" --batches 10,64 --reps 1 \
    --what fwd_bwd,iter --profile > "$OUT/profile.log" 2>&1
grep -E '^# (ours|torch) [a-z_]+: |^#   cuda' "$OUT/profile.log" | tee -a "$LOG"

say "== 3g. opt-in torch.compile (CUDA graphs) at small batches, both sides, the same host reads (session 9) [${SECONDS}s]"
bench 150 --batches 1,10 --reps 3 --what fwd_bwd,iter --compile --compile_mode reduce-overhead --baseline_same --host_reads both

NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
    say "== 4. tools/train.py --gpu all ($NGPU GPUs, NCCL) [${SECONDS}s]"
    W2=$(mktemp -d)
    cp -r tests/fixtures/caffe_reference/cli/train_test_snapshot/. "$W2/" && rm -f "$W2"/snap_iter_*
    (cd "$W2" && timeout "$(limit 120)" python3 "$R/tools/train.py" --solver solver.prototxt --weights init.caffemodel \
        --gpu all > "$OUT/gpu_train_all.log" 2>&1; echo "train --gpu all rc=$?"; ls snap_iter_*) | tee -a "$LOG"
fi
say "== done in ${SECONDS}s; logs in $OUT"
