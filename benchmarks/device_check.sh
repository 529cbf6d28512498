#!/usr/bin/env bash
# The GPU checks in one call on a lent GPU machine (CI never has one):
#   1. the SD-1.5 UNet step-time table of benchmarks/diffusion_customization.py on CUDA (bf16 mixed precision),
#      each method's whole step captured as a CUDA graph, then eager (Python launching every kernel),
#   2. tests/test_cuda.py (adapter under bf16 autocast, customize with checkpointing, search + AMP fine-tune),
#   3. GPU latency of the compressed models (benchmarks/latency.py --device cuda).
# Wheels the machine lacks (diffusers, ...) travel in .whl/ (git-ignored). Logs and JSON go to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
OUT=${OUT:-outputs/device}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers, peft, timm; print('torch', torch.__version__, 'diffusers',
diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'timm', timm.__version__)"
timeout "${SD_TIMEOUT:-150}" python3 benchmarks/diffusion_customization.py --arch sd15 --device cuda --cuda-graph \
    --sd-steps "${SD_STEPS:-50}" --json "$OUT/diffusion_customization_cuda_graph.json" 2>&1 | tee "$OUT/sd15_graph.log"
timeout "${SD_TIMEOUT:-150}" python3 benchmarks/diffusion_customization.py --arch sd15 --device cuda \
    --sd-steps "${SD_STEPS:-50}" --json "$OUT/diffusion_customization_cuda.json" 2>&1 | tee "$OUT/sd15.log"
timeout "${TEST_TIMEOUT:-180}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/customization/test_adapter.py tests/compression/test_lowrank.py 2>&1 | tee "$OUT/pytest_cuda.log"
timeout "${LAT_TIMEOUT:-50}" python3 benchmarks/latency.py --device cuda --batches 1 32 256 2>&1 | tee "$OUT/latency.log"
