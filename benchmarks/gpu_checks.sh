#!/usr/bin/env bash
# The GPU checks behind benchmarks/results/*_cuda.*: run from the repository root on a CUDA machine.
#   bash benchmarks/gpu_checks.sh [OUT_DIR]
# Where diffusers/peft/bitsandbytes are not installed (the lent GPU machines), wheels in .whl/ are used.
set -uo pipefail
OUT=${1:-${OUT:-outputs/gpu}}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
quiet() { grep -v -e "No LoRA keys" -e "^USDT" -e "should be kept in float32"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, diffusers, peft, accelerate; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| diffusers', diffusers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)"

# 1. Speed and memory at SD1.5 size (random weights, 512x512, bf16, CLIP-H-sized PickScore).
timeout 420 python3 -m benchmarks.speed_memory --sd15 --device cuda --output_dir "$OUT" 2>&1 | quiet | tee "$OUT/speed_memory_sd15.log"

# 2. The trainer's GPU paths on the toy: bf16 autocast, gradient checkpointing, 8-bit AdamW, validation reward.
rm -rf /tmp/draftplus-gpu-toy
timeout 150 python3 -m accelerate.commands.launch --config_file accelerate_configs/single_gpu.yaml train_draftplus.py \
  --pretrained_model_name_or_path toy --reward redness --prompts assets/toy/prompts.txt --resolution 32 \
  --num_inference_steps 10 --guidance_scale 5 --kl_coeff 0.01 --learning_rate 2e-2 --train_batch_size 4 \
  --max_train_steps 30 --checkpointing_steps 15 --mixed_precision bf16 --gradient_checkpointing --use_8bit_adam \
  --validation_prompts "a blue circle" "a green square" --output_dir /tmp/draftplus-gpu-toy --report_to none 2>&1 \
  | quiet | tail -n 12 | tee "$OUT/train_toy_gpu.log"
cp /tmp/draftplus-gpu-toy/metrics.jsonl /tmp/draftplus-gpu-toy/validation_reward.json "$OUT/" 2>/dev/null
ls "$OUT"
