#!/usr/bin/env bash
# One prepared GPU check, ≤ 7 minutes on a single-GPU machine, nothing to set up beyond the
# README's install:
#   1. the CUDA tests (pytest -m cuda): towers on their devices, the cuda:0 + cpu, cpu + cuda:0
#      (and cuda:0 + cuda:1) splits against one device in fp32 and fp64, training on one GPU (fp32
#      and bf16) and on the split, checkpoints back on CPU, the fused norms on the GPU against the
#      eager ones, DDP over NCCL (with 2 GPUs; 2 devices per process with 4);
#   2. tools/bench.py all --device cuda: model step, end to end from a store, ten-view eval, bf16,
#      channels_last, torch.compile, the fused norms (Triton) vs eager under bf16, augmentation on
#      the GPU vs in workers, the two-device split;
#   3. a compact table, last.
# Usage: tools/gpu_check.sh [extra bench.py all arguments]     (PYTHON=... to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PY (torch $($PY -c 'import torch; print(torch.__version__)'))" >&2
    exit 1
fi
LOG=$(mktemp -d)
WORKERS=$($PY -c "import os; print(min(8, max(1, (os.cpu_count() or 2) - 2)))")
$PY -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), '| devices', torch.cuda.device_count(), '| torch', torch.__version__)"

echo "== [1/2] CUDA tests"
# with two GPUs or more the DDP-over-NCCL tests run torchrun twice each: more time
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
timeout $(( NGPU > 1 ? 360 : 150 )) $PY -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$LOG/tests.txt" | tail -20
TESTS=${PIPESTATUS[0]}

echo "== [2/2] bench.py all --device cuda"
timeout 240 $PY tools/bench.py all --device cuda --batch 256 --steps 8 --images 4096 --eval-images 512 \
    --workers "$WORKERS" "$@" 2>&1 | tee "$LOG/bench.txt"
BENCH=${PIPESTATUS[0]}

echo
echo "==================================== gpu_check summary ===================================="
echo "CUDA tests: $(grep -E '[0-9]+ (passed|failed|error)' "$LOG/tests.txt" | tail -1) (exit $TESTS)"
sed -n '/^summary/,$p' "$LOG/bench.txt"
[ "$BENCH" = 0 ] || echo "bench.py exit $BENCH (124: ran past its 240 s limit)"
exit $(( TESTS != 0 || BENCH != 0 ))
