#!/usr/bin/env bash
# `replica train` and `replica eval` on one GPU as a user runs them, with the CUDA defaults
# (bf16, fused norms on, JPEG store decoded in the workers), then compile=true; each epoch's
# images/s from metrics.jsonl. The paper's net on a synthetic set; about 3 minutes on one H200.
#   tools/gpu_train.sh            on a machine with a GPU
#   tools/gpu_train.sh --dry-run  the same commands on the CPU, tiny (the net at 1/16 width)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
if [[ "${1:-}" == "--dry-run" ]]; then
  per=8; args=(devices=cpu width=0.0625 batch_size=8 steps_per_epoch=2 workers=1 fused_norms=false); compile=()
else
  per=410; args=(devices=cuda:0 batch_size=256 workers=8); compile=(compile=true)
fi
"$PY" -m replica synth "$W/synth" --classes 10 --train-per-class "$per" --val-per-class 20 --workers 8
"$PY" -m replica prepare "$W/synth" "$W/store" --format jpeg --workers 8
run() {  # name, overrides...
  local name=$1; shift
  local t0=$SECONDS
  "$PY" -m replica train configs/alexnet-2gpu.yaml "data=$W/store" bf16=true epochs=3 init=caffe val_batches=2 \
    save_best=false "${args[@]}" "$@" --out "$W/$name" 2>&1 | grep -v "it/s\]" || return 1
  "$PY" - "$W/$name" "$name" $((SECONDS - t0)) <<'EOF'
import json, sys
from pathlib import Path
lines = [json.loads(x) for x in (Path(sys.argv[1]) / "metrics.jsonl").read_text().splitlines()]
print(f"RESULT {sys.argv[2]}: {sys.argv[3]} s in all; images/s by epoch: "
      + ", ".join(f"{x['images_per_s']:.0f}" for x in lines) + f"; loss {lines[-1]['train_loss']:.3f}")
EOF
}
run defaults
[[ ${#compile[@]} -gt 0 ]] && run compile "${compile[@]}"
"$PY" -m replica eval "$W/defaults" --batch 128
echo "gpu_train: done"
