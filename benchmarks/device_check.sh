#!/usr/bin/env bash
# The GPU checks of the coder and of the paper run's cost, in one go (a session lent a GPU runs this; each step has
# its own time limit so that one slow step leaves the others' results):
#   1. the wavefront coder's tests with the codecs and images on the GPU (round trip of 20 random and 5 COCO
#      images at N=48 and N=192, the wrong order caught, sizes within 0.5% of CompressAI's coder);
#   2. CompressAI's compress/decompress vs the wavefront coder per image at 832x1216 N=192 and at the demo's size;
#   3. the evaluation's per-image cost at the paper's sizes (832x1088 detection, 576x576 segmentation) and with the
#      demo's start codec: one image at a time and in groups of 8, g_a / g_s / rANS shares;
#   4. ICM training throughput at the paper's detection settings (N=192, batch 16, 256 crops, the X101-FPN
#      recognizer rebuilt from torchvision parts, random weights): the plain loop vs the suite's train_icm.
# Usage, from the repository root:  bash benchmarks/device_check.sh OUTDIR [COCO_VAL_FOLDER]
#   SKIP_TRAIN=1 leaves out step 4; CODER_IMAGES="2 8" sets step 2's images per size (default "3 8").
set -uo pipefail
out=${1:?usage: benchmarks/device_check.sh OUTDIR [COCO_VAL_FOLDER]}
coco=${2:-/work/shared/data/coco_tiny/val2017}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
step() {  # step NAME LIMIT_S COMMAND...: run, log, and record the exit status and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit} s): $*"
  timeout "$limit" "$@"
  echo "=== $name: exit $?, $((SECONDS - t0)) s"
}
{
  $py -c "import torch, compressai; print('torch', torch.__version__, 'compressai', compressai.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nproc
} > "$out/environment.txt" 2>&1
step wavefront_tests 150 env ICM_TEST_DEVICE=cuda ICM_TEST_COCO="$coco" $py -m pytest -q -p no:cacheprovider \
  tests/test_wavefront.py -k "not benchmark_cli" > "$out/wavefront_cuda_tests.txt" 2>&1
step coder 150 $py -m benchmarks.coder --device cuda --threads 4 --data "$coco" \
  --config 832x1216:192 --config 128x128:48 --images ${CODER_IMAGES:-3 8} --out "$out/coder_cuda.json"
step eval_coder 150 $py -m benchmarks.eval_coder --device cuda --threads 4 --data "$coco" \
  --config 832x1088:192 --config 576x576:192 --config 128x128:icm_helpers/assets/demo/codec_start.pt \
  --images 8 8 16 --batch 8 --out "$out/eval_coder_cuda.json"
[ -n "${SKIP_TRAIN:-}" ] || step train_bench 150 $py papermill_runs/bench.py --device cuda \
  --recognizer torchvision-x101 --steps 40 --warmup 10 --out "$out/bench_train_cuda.json"
