#!/usr/bin/env bash
# One GPU suite, under 8 minutes on one GPU (step limits add up to 490 s); everything lands under benchmarks/results/gpu/.
#
#   bash benchmarks/gpu_suite.sh            # needs CUDA; installs nothing, uses the current python
#   GPU_SUITE_QUICK=1 bash benchmarks/gpu_suite.sh   # a 2-minute smoke version of every step
#   GPU_SUITE_QUICK=1 GPU_SUITE_DEVICE=cpu GPU_SUITE_OUT=/tmp/gpu bash benchmarks/gpu_suite.sh
#                                           # check the script without a GPU (float32 latency, out of the repo)
#
# Steps (each has its own time limit, and a failed step does not stop the others; the summary
# in results/gpu/suite.json says which passed):
#   1. the tests on CUDA (pytest -m cuda: prepare/complexity_loss/finalize/prune/shrink on a CUDA
#      model, gates and buffers on its device, bf16/fp16 autocast steps, torch.compile of a
#      prepared model's training step and of a pruned model)
#   2. latency at 50% MACs: ResNet-50, MobileNetV2, ViT-B/16 at batch 1 and 64, fp16, eager and compiled
#   3. training-step overhead of prepare at batch 64 on CUDA
#   4. benchmarks/quality.py on CUDA, 3 seeds (the rows so far stay in quality.partial.json at the limit)
#   5. HFP under FSDP2 on the GPU(s) (examples/fsdp_train.py under torchrun, nccl; CPU: gloo, 2 ranks)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_SUITE_OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
QUICK=${GPU_SUITE_QUICK:-0}
DEV=${GPU_SUITE_DEVICE:-cuda}
DTYPE=float16; [ "$DEV" = cpu ] && DTYPE=float32  # CPU half-precision kernels are too slow for a dry run
if [ "$DEV" = cuda ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA device visible to $PY (torch.cuda.is_available() is False)" >&2
  exit 2
fi
$PY - > "$OUT/environment.json" <<'EOF'
import json, platform, torch
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if cuda else None,
                  "python": platform.python_version()}, indent=1))
EOF
declare -A STATUS SECONDS_OF
step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  STATUS[$name]=$rc
  SECONDS_OF[$name]=$((SECONDS - t0))
  echo "   rc=$rc in ${SECONDS_OF[$name]}s (log: $OUT/$name.log)"
  tail -n 5 "$OUT/$name.log"
}

if [ "$QUICK" = 1 ]; then
  LAT_MODELS="resnet18"; LAT_BATCH="1"; LAT_TIME=0.05; Q_ARGS="--quick"
  OVER_ARGS="--models resnet18 --size 64 --steps 3 --warmup 1"
else
  LAT_MODELS="resnet50 mobilenet_v2 vit_b_16"; LAT_BATCH="1 64"; LAT_TIME=0.1; Q_ARGS="--seeds 0 1 2"
  OVER_ARGS="--models resnet50 mobilenet_v2 --steps 20"
fi

step tests 40 $PY -m pytest -q -m cuda tests/test_device.py --junitxml="$OUT/tests.xml"
# compiling costs far more than timing, so the compiled step gets most of the time; latency.py
# writes its JSON after every model, so a step that hits its limit keeps the models it finished
for mode in eager compiled; do
  extra=""; limit=60
  if [ "$mode" = compiled ]; then extra="--compile"; limit=150; fi
  step "latency_$mode" $limit $PY benchmarks/latency.py --device $DEV --dtype $DTYPE --kinds macs --targets 0.5 \
    --round-to 1 --models $LAT_MODELS --batch $LAT_BATCH --rounds 20 --min-run-time $LAT_TIME $extra \
    --out "$OUT/latency_${DTYPE}_$mode.json"
done
step overhead 45 $PY benchmarks/overhead.py --devices $DEV --batch 64 $OVER_ARGS --out "$OUT/overhead_b64.json"
# Fashion-MNIST: $FASHION_MNIST_DIR (the IDX files) where the machine cannot install the Debian package
step quality 135 $PY benchmarks/quality.py --device $DEV --threads 4 $Q_ARGS ${FASHION_MNIST_DIR:+--data-dir "$FASHION_MNIST_DIR"} \
  --out "$OUT/quality.json"
if [ "$DEV" = cuda ]; then NPROC=$($PY -c "import torch; print(max(1, torch.cuda.device_count()))"); else NPROC=2; fi
step fsdp 60 $PY -m torch.distributed.run --nproc_per_node=$NPROC --master_addr=127.0.0.1 --master_port=29631 \
  examples/fsdp_train.py --steps 20 --out "$OUT/fsdp"

{
  echo "{"
  first=1
  for name in "${!STATUS[@]}"; do
    [ $first = 1 ] || echo ","
    first=0
    printf '  "%s": {"rc": %s, "seconds": %s}' "$name" "${STATUS[$name]}" "${SECONDS_OF[$name]}"
  done
  echo ""
  echo "}"
} > "$OUT/suite.json"
cat "$OUT/suite.json"
for name in "${!STATUS[@]}"; do [ "${STATUS[$name]}" = 0 ] || exit 1; done
