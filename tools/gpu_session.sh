#!/usr/bin/env bash
# A GPU lease's prepared work in one device call (≤ 10 minutes): tools/gpu_perf.py (≤ 7 minutes),
# then `replica demo` trained on the GPU (its figures beside the CPU's in docs/demo.md). Each log
# is written into OUT as it runs, so what ran comes back even when the call is cut short:
#   DATE-GPU-perf.log   gpu_perf's rows, targets and SUGGEST lines (keep it in docs/gpu-runs/)
#   DATE-GPU-demo.log   the demo's output; eval.json, report.md, curves.png, filters.png beside it
# 6 files: the device tool brings back at most 8. Nothing is installed: the interpreter's own torch.
#
#   tools/gpu_session.sh OUT                 on the lent machine, e.g. the device tool's
#                                            run(command="tools/gpu_session.sh $OUT", timeout_s=600)
#   tools/gpu_session.sh OUT --dry-run       the same on the CPU (gpu_perf's dry run, the tiny demo)
#   tools/gpu_session.sh OUT --only p,m      arguments after OUT go to gpu_perf.py
# PYTHON=... picks the interpreter. The exit status is gpu_perf's, or the demo's if that failed.
set -uo pipefail
if [[ $# -lt 1 || $1 == -* ]]; then
  echo "usage: tools/gpu_session.sh OUT [--dry-run] [gpu_perf.py's --only ...]" >&2
  exit 2
fi
out=$1; shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PERF_LIMIT_S=${PERF_LIMIT_S:-460}  # gpu_perf's checks take at most 415 s, plus five start-ups of torch
DEMO_LIMIT_S=${DEMO_LIMIT_S:-120}

dry=0
for a in "$@"; do [[ $a == --dry-run ]] && dry=1; done
mkdir -p "$out" || exit 2
gpu=$("$PY" -c 'import torch, re
n = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print(re.sub(r"[^a-z0-9]+", "-", n.lower().replace("nvidia", "")).strip("-") or "gpu")') || exit 2
stem="$out/$(date -u +%Y-%m-%d)-$gpu"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "gpu_session: $(date -u +%FT%TZ) on $gpu; logs in $stem-{perf,demo}.log" >&2
timeout -k 10 "$PERF_LIMIT_S" "$PY" tools/gpu_perf.py "$@" 2>&1 | tee "$stem-perf.log"
perf=${PIPESTATUS[0]}

if [[ $dry == 1 ]]; then demo_args=(--tiny --devices cpu); else demo_args=(--devices cuda:0); fi
{
  echo "replica demo ${demo_args[*]} (the CPU's figures: docs/demo.md)"
  start=$(date +%s)
  timeout -k 10 "$DEMO_LIMIT_S" "$PY" -m replica demo --out "$work/demo" "${demo_args[@]}"
  rc=$?
  echo "gpu_session: replica demo exited $rc after $(( $(date +%s) - start )) s"
  exit $rc
} 2>&1 | tee "$stem-demo.log"
demo=${PIPESTATUS[0]}
for f in eval.json report.md curves.png filters.png; do
  [[ -f $work/demo/run/$f ]] && cp "$work/demo/run/$f" "$stem-demo-$f"
done
echo "gpu_session: gpu_perf exited $perf, the demo $demo" >&2
(( perf != 0 )) && exit "$perf"
exit "$demo"
