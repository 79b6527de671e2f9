#!/usr/bin/env bash
# One-shot GPU check (issue 8): run from the repository root on a machine with CUDA.
#
#   OUT=gpu_check_out bash benchmarks/gpu_check.sh
#
# Writes its logs under $OUT and prints a summary. Steps (each with its own time limit, so that a
# slow step cannot eat the others' time):
#   1. every real-Caffe layer case in GPU mode, contiguous and channels_last, + the CUDA-only tests;
#   2. tools/train.py --gpu 0 on the `caffe train` fixture, its snapshot against Caffe's;
#   3. the AlexNet benchmark in float32 (IEEE, TF32 off) and bf16 + channels_last, and the
#      interpreter's per-call overhead on a tiny AlexNet (bench_overhead.py);
#   4. with two or more GPUs: tools/train.py --gpu all (NCCL), snapshots written once.
# A folder .whl/ of wheels (e.g. protobuf, lmdb for the machine's Python) is installed first
# when present, for machines that cannot reach a package index.
set -u
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
R=$PWD
export PYTHONUNBUFFERED=1 PYTHONPATH=$R
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$R
fi
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/device.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())" \
    | tee -a "$OUT/device.txt"

echo "== 1. conformance in GPU mode"
CAFFE_COMPAT_TEST_GPU=1 timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=line \
    tests/test_conformance_layers.py tests/test_layers_loss.py tests/test_host_mirror.py 2>&1 | tail -5 \
    | tee "$OUT/gpu_conformance.log"

echo "== 2. tools/train.py --gpu 0 against Caffe's snapshot"
W=$(mktemp -d)
cp -r tests/fixtures/caffe_reference/cli/train_test_snapshot/. "$W/" && rm -f "$W"/snap_iter_*
(cd "$W" && timeout 90 python3 "$R/tools/train.py" --solver solver.prototxt --weights init.caffemodel --gpu 0 \
    > "$OUT/gpu_train.log" 2>&1; echo "train rc=$?")
timeout 30 python3 - "$W" <<'EOF' | tee "$OUT/gpu_train_compare.log"
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

echo "== 3. AlexNet benchmark"
timeout 150 python3 benchmarks/bench_alexnet.py --device cuda --batches 1,10,64,128 --reps 3 2>&1 \
    | grep -v '^USDT' | tee "$OUT/bench_gpu_fp32.log"
timeout 90 python3 benchmarks/bench_alexnet.py --device cuda --batches 64,128 --reps 3 --precision bf16 \
    --channels_last --baseline_same --what fwd_bwd,iter 2>&1 | grep -v '^USDT' | tee "$OUT/bench_gpu_bf16.log"

timeout 60 python3 benchmarks/bench_alexnet.py --device cuda --batches 1,10 --reps 3 --what fwd --fwd_api run 2>&1 \
    | grep -v '^USDT' | tee "$OUT/bench_gpu_fwd_run.log"
timeout 60 python3 benchmarks/bench_overhead.py --device cuda --reps 5 2>&1 | grep -v '^USDT' \
    | tee "$OUT/bench_gpu_overhead.log"

NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
    echo "== 4. tools/train.py --gpu all ($NGPU GPUs, NCCL)"
    W2=$(mktemp -d)
    cp -r tests/fixtures/caffe_reference/cli/train_test_snapshot/. "$W2/" && rm -f "$W2"/snap_iter_*
    (cd "$W2" && timeout 120 python3 "$R/tools/train.py" --solver solver.prototxt --weights init.caffemodel --gpu all \
        > "$OUT/gpu_train_all.log" 2>&1; echo "train --gpu all rc=$?"; ls snap_iter_* | tee "$OUT/gpu_train_all_snapshots.txt")
fi
echo "== done; logs in $OUT"
