#!/usr/bin/env bash
# The GPU checks of dpolab (issue 19), for a session lent a CUDA machine through the `device` tool.
#
#   bash bench/gpu_check.sh --prepare    # HERE: wheels the GPU machine lacks into .whl/, SmolLM2's config and
#                                        # tokenizer into .gpu/smollm2 (both git-ignored)
#   bash bench/gpu_check.sh              # THERE (carry .whl and .gpu): about 8 minutes on one H200
#
# The GPU machine has its own CUDA build of torch (and transformers, accelerate, peft) and reaches no
# network, so the CUDA torch is the one it has; what it lacks travels as wheels for its Python 3.12:
# dpolab's own transformers, TRL 1.16 and datasets. Then:
# 1. the layout-equivalence tests on CUDA (tests/test_layouts.py with DPOLAB_TEST_DEVICE=cuda): every
#    layout against each sequence run alone, losses and gradients, under SDPA, eager and FlexAttention (its
#    BlockMask) in fp32, and the same under bf16 autocast; and tests/test_lean.py (the lean backward) on CUDA;
# 2. bench/gpu_bench.py: dpolab against TRL in bf16 on SmolLM2's shape and on a 0.5B Llama at 1k-token pairs
#    (tokens/s, MFU against the bf16 matmul peak, peak GPU memory), and FlexAttention's compiles per row length.
# Results: $OUT (the device tool's folder) or bench/results: gpu.json, tests.log, bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="transformers==5.24.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"

if [[ "${1:-}" == "--prepare" ]]; then
    rm -rf .whl && mkdir -p .whl .gpu/smollm2
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS || exit 1
    model="${DPOLAB_REAL_MODEL:-$HOME/.cache/dpolab/smollm2-135m-instruct}/model"
    for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja \
             generation_config.json; do
        [[ -f "$model/$f" ]] && cp "$model/$f" .gpu/smollm2/
    done
    [[ -f .gpu/smollm2/tokenizer.json ]] || { echo "no SmolLM2 in $model: run make real-model" >&2; exit 1; }
    du -sh .whl .gpu
    echo "prepared: now run bench/gpu_check.sh on the GPU machine, carrying .whl and .gpu"
    exit 0
fi

RESULTS="${OUT:-bench/results}"
mkdir -p "$RESULTS"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'trl', trl.__version__, torch.cuda.get_device_name())"

echo "== layout equivalence on CUDA (sdpa, eager, flex_attention; fp32 and bf16 autocast)"
DPOLAB_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_layouts.py \
    -k "log_prob_alone or same_loss or bf16 or flex_bucket or mask_forms" 2>&1 | tee "$RESULTS/tests.log" | tail -25
echo "== the lean backward against autograd on CUDA (fp32 and bf16 autocast)"
DPOLAB_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_lean.py 2>&1 \
    | tee -a "$RESULTS/tests.log" | tail -5

echo "== dpolab against TRL in bf16, and FlexAttention's compiles"
timeout 420 python3 bench/gpu_bench.py --tokenizer .gpu/smollm2 --out "$RESULTS" 2>&1 | tee "$RESULTS/bench.log"
