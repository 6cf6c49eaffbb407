#!/usr/bin/env bash
# The GPU checks behind benchmarks/results/*_cuda.* and the GPU trainer runs: from the repository root on a CUDA machine,
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR] [STAGE ...]        # default OUT_DIR: $OUT, else outputs/gpu
#
# Stages, most important first. With no STAGE named, they run in this order, each one started only while its
# minimum time is left before DEADLINE_S (default 560 s after the start, for a 10-minute device call); every stage
# writes its results as it goes, and results.tgz is repacked after each one, so a cut-off run keeps what it measured.
#   sd15           ~5 min  SD1.5 size, 512px, bf16, batch 4, T=50 and 10: training sample eager and --compile against
#                          StableDiffusionPipeline.__call__ with a plain UNet (eager; compiled as diffusers documents)
#                          and with the LoRA-wrapped UNet; kernel time, compile time, compiled-vs-eager differences;
#                          whole-process peak at batch 1
#   train          ~2 min  the trainer on the toy on GPU (bf16, gradient checkpointing, 8-bit AdamW), 32 validation
#                          images: kl 0.01 (the README quickstart's, like for like: since the default decodes x0 at the
#                          last step, the reward's gradient is ~3.4x what it was when kl 0.003 was the quickstart's)
#                          and kl 0.003 (the earlier quickstart's); if the kl 0.01 run's validation reward falls, the same run in
#                          fp32 with torch AdamW, to tell precision/8-bit effects from the method
#   sdxl_mem       ~2 min  SDXL-base size, 1024px, bf16, batch 1, K=1, gradient checkpointing, PickScore code path:
#                          peak memory against a 24 GB card, training sample / plain StableDiffusionXLPipeline.__call__
#                          at T=50, eager
#   train_compile  ~1.5 min the kl 0.01 trainer run again with --compile (the flag end to end on GPU)
#   sd15_b1        ~4 min  as sd15 at batch 1
#   sd15_mem       ~2 min  SD1.5 size: memory kept for backward against T (eager and --compile) and K; profiles
#   sdxl           ~7 min  as sd15 at SDXL size, batch 1 (a second device call: bash benchmarks/gpu_checks.sh "$OUT" sdxl)
#   sd35m_mem      ~3 min  SD3.5-Medium size (real configs, T5-XXL included, random weights), 1024px, bf16, batch 1,
#                          K=1, T=28, gradient checkpointing, PickScore code path: peak memory against 24 GB, training
#                          sample / StableDiffusion3Pipeline.__call__ (benchmarks/flow_memory.py)
#   flux_nf4_mem   ~4 min  as sd35m_mem at FLUX.1-dev size with the transformer in 4-bit NF4: peak against 24 GB
#   flux_mem       ~4 min  as sd35m_mem at FLUX.1-dev size, bf16: peak against 80 GB
#                          (every memory stage also runs the estimator, train_draftplus.py --estimate_memory, for its
#                          setting: results/memory_estimate_*.txt beside the measurement; python -m
#                          benchmarks.memory_calibration compares them once the measurements are in results/)
#                          (these three need their own device call: bash benchmarks/gpu_checks.sh "$OUT" sd35m_mem
#                          flux_nf4_mem flux_mem)
#
# Files in OUT_DIR: gpu_checks.log (everything printed), summary.md (the reports so far), results.tgz (results/: the
# files for benchmarks/results/; logs/). To land them: tar xzf results.tgz && cp results/* benchmarks/results/ &&
# python -m benchmarks.report.
# DRY_RUN=1: every stage on this machine's CPU at tiny sizes (--smoke, aot_eager, few steps): the script and its
# Python entry points end to end in a few minutes, before spending device time on them.
# Where diffusers/peft/bitsandbytes are not installed (the lent GPU machines), wheels in .whl/ are used
# (bash benchmarks/fetch_gpu_wheels.sh fetches them; carry .whl to the machine).
set -uo pipefail
OUT=${1:-${OUT:-outputs/gpu}}
shift $(( $# > 0 ? 1 : 0 ))
STAGES=("$@")
DEADLINE_S=${DEADLINE_S:-560}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/draftplus-gpu-XXXX)
RES=$WORK/results
LOGS=$WORK/logs
mkdir -p "$RES" "$LOGS"
exec > >(tee -a "$OUT/gpu_checks.log") 2>&1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
quiet() { grep --line-buffered -v -e "No LoRA keys" -e "^USDT" -e "should be kept in float32" -e "Loading weights" \
  -e "Writing model shards" -e "Loading pipeline components"; }
if (( DRY_RUN )); then
  # Later options win: tiny shapes, CPU, aot_eager, few steps; the trainer on CPU without 8-bit AdamW.
  SPEED_DRY=(--device cpu --smoke --compile_backend aot_eager --steps 3 2 --repeats 1 --memory_steps 2 3
    --memory_truncations 1)
  FLOW_DRY=(--device cpu --smoke --steps 3 --repeats 1)
  TRAIN_DRY=(--max_train_steps 3 --num_validation_images 2)
  ACCELERATE_CONFIG=accelerate_configs/cpu.yaml
  GPU_TRAIN=(--mixed_precision bf16 --gradient_checkpointing)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DRAFTPLUS_COMPILE_BACKEND=aot_eager
  echo "DRY RUN on CPU: tiny shapes, the numbers mean nothing"
else
  SPEED_DRY=()
  FLOW_DRY=()
  TRAIN_DRY=()
  ACCELERATE_CONFIG=accelerate_configs/single_gpu.yaml
  GPU_TRAIN=(--mixed_precision bf16 --gradient_checkpointing --use_8bit_adam)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if ! python3 -c "import torch, bitsandbytes as bnb; p = torch.nn.Parameter(torch.ones(4096, device='cuda')); \
p.grad = torch.ones_like(p); bnb.optim.AdamW8bit([p]).step(); print('bitsandbytes', bnb.__version__)"; then
    echo "bitsandbytes' 8-bit AdamW does not run here: the trainer runs use torch AdamW"
    GPU_TRAIN=(--mixed_precision bf16 --gradient_checkpointing)
  fi
fi
python3 -c "import torch, transformers, diffusers, peft, accelerate; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| diffusers', diffusers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)" \
  || exit 1

pack() {
  tar czf "$OUT/results.tgz.tmp" -C "$WORK" results logs && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
  { for f in "$RES"/*.md; do [ -e "$f" ] && { cat "$f"; echo; }; done
    python3 -m benchmarks.report --gpu_training_only "$RES" 2>/dev/null; } > "$OUT/summary.md"
}

left() { echo $(( DEADLINE_S - SECONDS )); }

# run_stage NAME MIN MAX: the stage's function under a limit of MAX seconds (less if less is left before the
# deadline), if at least MIN seconds are left; else it says how to run it later.
run_stage() {
  local name=$1 min=$2 max=$3
  if (( ${#STAGES[@]} )) && [[ ! " ${STAGES[*]} " =~ " $name " ]]; then return; fi
  if (( $(left) < min )); then
    echo "=== $name: skipped, $(left) s left (needs ~$min s); later: bash benchmarks/gpu_checks.sh \"\$OUT\" $name"
    return
  fi
  local limit=$(( $(left) < max ? $(left) : max ))
  echo "=== $name: start at ${SECONDS}s, limit ${limit}s"
  "stage_$name" "$limit"
  echo "=== $name: done at ${SECONDS}s (exit $?)"
  pack
}

bench() {  # bench MODULE TIMEOUT LOGNAME ARGS...: benchmarks/MODULE.py into results/, its log into logs/LOGNAME.log
  local module=$1 limit=$2 log=$3
  shift 3
  timeout "$limit" python3 -m "benchmarks.$module" --device cuda --output_dir "$RES" "$@" 2>&1 \
    | quiet \
    | tee "$LOGS/$log.log"
}
speed() { bench speed_memory "$@" "${SPEED_DRY[@]}"; }  # speed TIMEOUT LOGNAME ARGS...
flow() { bench flow_memory "$@" "${FLOW_DRY[@]}"; }  # flow TIMEOUT LOGNAME ARGS...

train_toy() {  # train_toy TIMEOUT RUN ARGS...: the quickstart's run on GPU; results/gpu_train_toy_RUN_*
  local limit=$1 run=$2
  shift 2
  local dir=$WORK/train_$run
  local args=(--pretrained_model_name_or_path toy --reward redness --prompts assets/toy/prompts.txt --resolution 32
    --num_inference_steps 10 --guidance_scale 5 --learning_rate 2e-2 --train_batch_size 4 --max_train_steps 40
    --checkpointing_steps 40 --validation_prompts "a blue circle" "a green square" --num_validation_images 16
    --output_dir "$dir" --report_to none "$@" "${TRAIN_DRY[@]}")
  echo "train_draftplus.py ${args[*]}" > "$RES/gpu_train_toy_${run}_command.txt"
  timeout "$limit" python3 -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" \
    train_draftplus.py "${args[@]}" 2>&1 | quiet | grep -v "it/s\]" | tee "$LOGS/train_$run.log" | tail -n 6
  cp "$dir/metrics.jsonl" "$RES/gpu_train_toy_${run}_metrics.jsonl" 2>/dev/null
  cp "$dir/validation_reward.json" "$RES/gpu_train_toy_${run}_validation.json" 2>/dev/null
  cp "$dir/validation_before_after.png" "$LOGS/train_${run}_before_after.png" 2>/dev/null
}


# estimate NAME CONFIGS ARGS...: the memory estimator (train_draftplus.py --estimate_memory, on this machine's CPU) for
# the setting a memory stage measures, beside its measurement: results/memory_estimate_NAME.txt.
estimate() {
  local name=$1 configs=$2
  shift 2
  (( DRY_RUN )) && return
  timeout 300 python3 train_draftplus.py --pretrained_model_name_or_path "benchmarks/model_configs/$configs" \
    --estimate_memory --mixed_precision bf16 --reward pickscore --report_to none "$@" \
    > "$RES/memory_estimate_$name.txt" 2>&1 && head -n 1 "$RES/memory_estimate_$name.txt"
}
stage_sd15() {
  speed "$1" sd15 --sd15 --batch_sizes 4 --steps 50 10 --sections timing peak
  estimate sd15_ckpt sd15 --resolution 512 --reward_dtype bf16 --num_inference_steps 50 --gradient_checkpointing
  estimate sd15 sd15 --resolution 512 --reward_dtype bf16 --num_inference_steps 50
}
stage_sd15_b1() { speed "$1" sd15_b1 --sd15 --batch_sizes 1 --steps 50 10 --sections timing; }
stage_sd15_mem() { speed "$1" sd15_mem --sd15 --batch_sizes 4 --steps 50 --sections memory profile; }
stage_sdxl_mem() {
  speed "$1" sdxl_mem --sdxl --batch_sizes 1 --steps 50 --sides train pipeline --gradient_checkpointing \
    --warmup 1 --sections peak timing
  estimate sdxl_ckpt sdxl --resolution 1024 --reward_dtype bf16 --num_inference_steps 50 --gradient_checkpointing
}
stage_sdxl() { speed "$1" sdxl --sdxl --batch_sizes 1 --steps 50 10 --sections timing; }
stage_train() {
  local end=$(( SECONDS + $1 ))
  train_toy "$(( end - SECONDS ))" kl0.01 --kl_coeff 0.01 "${GPU_TRAIN[@]}"
  if python3 -c "import json,sys; v=json.load(open(sys.argv[1])); sys.exit(v['after'] > v['before'])" \
      "$RES/gpu_train_toy_kl0.01_validation.json" 2>/dev/null; then
    echo "kl 0.01: the validation reward did not rise on GPU; the same run in fp32 with torch AdamW next"
    train_toy "$(( end - SECONDS ))" kl0.01_fp32 --kl_coeff 0.01 --mixed_precision no
  fi
  (( end - SECONDS > 30 )) && train_toy "$(( end - SECONDS ))" kl0.003 --kl_coeff 0.003 "${GPU_TRAIN[@]}"
}
stage_train_compile() { train_toy "$1" kl0.01_compile --kl_coeff 0.01 "${GPU_TRAIN[@]}" --compile; }
FLOW_ESTIMATE=(--resolution 1024 --reward_dtype bf16 --gradient_checkpointing)  # flow_memory.py's setting
stage_sd35m_mem() { flow "$1" sd35m_mem --model sd35m; estimate sd35m sd35-medium "${FLOW_ESTIMATE[@]}"; }
stage_flux_nf4_mem() {
  flow "$1" flux_nf4_mem --model flux1dev --quantize_base nf4
  estimate flux_nf4 flux1-dev "${FLOW_ESTIMATE[@]}" --quantize_base nf4
}
stage_flux_mem() { flow "$1" flux_mem --model flux1dev; estimate flux flux1-dev "${FLOW_ESTIMATE[@]}"; }

run_stage sd15 200 360
run_stage train 90 150
run_stage sdxl_mem 120 180
run_stage train_compile 80 120
run_stage sd15_b1 200 330
run_stage sd15_mem 100 200
run_stage sdxl 300 560
run_stage sd35m_mem 150 300
run_stage flux_nf4_mem 200 360
run_stage flux_mem 200 360
pack
echo "=== all done at ${SECONDS}s; results in $OUT"
ls -la "$OUT"
