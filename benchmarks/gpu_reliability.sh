#!/usr/bin/env bash
# The reliability paths only a CUDA machine runs (not yet run: the session that wrote it had no GPU).
#   bash benchmarks/gpu_reliability.sh [OUT_DIR]      (~2 minutes on one GPU)
# 1. fp16 with accelerate's gradient scaler and a reward that turns NaN at steps 3 and 6: those steps are
#    skipped (nonfinite_steps 1, then 2), gradient overflows stay the scaler's, the run ends with exit 0.
# 2. SIGTERM during a bf16 run with 8-bit AdamW: checkpoint at the current step, exit 143; the resume ends
#    with a LoRA close to an uninterrupted run's (GPU kernels need not be bitwise deterministic).
set -uo pipefail
OUT=${1:-${OUT:-outputs/gpu-reliability}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
ARGS=(--pretrained_model_name_or_path toy --prompts assets/toy/prompts.txt --resolution 32 --num_inference_steps 10
      --guidance_scale 5 --kl_coeff 0.01 --learning_rate 2e-2 --train_batch_size 4 --report_to none)
cat > /tmp/nan_reward.py <<'EOF'
CALLS = [0]
def red(images, prompts):
    CALLS[0] += 1
    score = images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))
    return score * float("nan") if CALLS[0] in (3, 6) else score
EOF
rm -rf /tmp/gr-fp16
timeout 150 python3 train_draftplus.py "${ARGS[@]}" --reward /tmp/nan_reward.py:red --mixed_precision fp16 \
  --max_train_steps 10 --checkpointing_steps 5 --output_dir /tmp/gr-fp16 > "$OUT/fp16_nan.log" 2>&1
echo "fp16 + NaN reward: exit $? (expected 0)"
python3 -c "import json; rows=[json.loads(l) for l in open('/tmp/gr-fp16/metrics.jsonl')]; \
print('nonfinite_steps', [r['nonfinite_steps'] for r in rows], '(expected 0 0 1 1 1 2 2 2 2 2)')"

rm -rf /tmp/gr-term /tmp/gr-straight
BF16=(--mixed_precision bf16 --use_8bit_adam --checkpointing_steps 100)
python3 train_draftplus.py "${ARGS[@]}" --reward redness "${BF16[@]}" --max_train_steps 60 --output_dir /tmp/gr-term \
  > "$OUT/term.log" 2>&1 &
PID=$!
while [ "$(cat /tmp/gr-term/metrics.jsonl 2>/dev/null | wc -l)" -lt 5 ]; do sleep 0.2; done
kill -TERM $PID; wait $PID; echo "SIGTERM: exit $? (expected 143); $(grep 'Stopped by' "$OUT/term.log")"
python3 train_draftplus.py "${ARGS[@]}" --reward redness "${BF16[@]}" --max_train_steps 60 --output_dir /tmp/gr-term \
  --resume_from_checkpoint latest > "$OUT/resume.log" 2>&1; echo "resume: exit $?"
python3 train_draftplus.py "${ARGS[@]}" --reward redness "${BF16[@]}" --max_train_steps 60 \
  --output_dir /tmp/gr-straight > "$OUT/straight.log" 2>&1; echo "straight: exit $?"
python3 - <<'EOF'
from safetensors.torch import load_file
a, b = (load_file(f"/tmp/gr-{n}/pytorch_lora_weights.safetensors") for n in ("term", "straight"))
diff = max((a[k] - b[k]).abs().max().item() for k in a)
scale = max(b[k].abs().max().item() for k in b)
print(f"resumed vs uninterrupted LoRA: max |diff| {diff:.3g} (largest weight {scale:.3g})")
EOF
