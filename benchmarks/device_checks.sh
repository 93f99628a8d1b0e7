#!/usr/bin/env bash
# The accelerator measurements the docs wait for (docs/performance.md "What waits for a device",
# "Depth-continuous batching"), in one run meant to fit in ten minutes on one GPU (not yet run
# on one):
#
#   bash benchmarks/device_checks.sh OUT_DIR
#
# Every report names the device it ran on; keep the JSON and text files in results/ with the
# device in their names (…-h100.json). MODEL and TRAIN_CONFIG swap the models, e.g.
# MODEL=tiny TRAIN_CONFIG=configs/tiny.yaml to try the script on a CPU in a minute.
set -euo pipefail
out=${1:?usage: bash benchmarks/device_checks.sh OUT_DIR}
py=${PYTHON:-python}
model=${MODEL:-bench-28m}
train_config=${TRAIN_CONFIG:-configs/bench-1b.yaml}
mkdir -p "$out"

run() {  # run NAME COMMAND…: the command's output to the screen and to OUT_DIR/NAME.txt
  local name=$1
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.txt"
}

# Depth-continuous batching against lockstep exit: a queue of 128 prompts on 16 and 64 rows,
# each schedule's own prefills left out of the decoding rate, the variants alternating; @0 is
# continuous batching without the boundary wait. The "schedule" column is the conversion the
# weight-read model predicts for each schedule as it ran (docs/performance.md "Counting the
# schedule's weight reads"). At random init every row exits after about the same number of
# steps, so this measures what the continuous program costs more than what it can gain.
for criterion in latent-diff kl; do
  run "bench-sample-continuous-queue-$model-$criterion" \
    "$py" -m rdlm bench sample "$model" --exit "$criterion" \
    --variants full,exit,exit-continuous@0,exit-continuous --batches 16,64 --queue 128 --prompt-len 32 \
    --new-tokens 32 --steps 32 --decode-rate --rounds 2 \
    --json "$out/bench-sample-continuous-queue-$model-$criterion.json"
done

# Attention over each row's own recurrence slot, one layer at Huginn-0125's heads: the
# platform's row-entries kernel against the gather it replaces (docs/performance.md "On GPU: a
# Triton kernel for the rows' own entries").
for rows in 16 64; do
  run "row-attention-b$rows" "$py" benchmarks/row_attention.py --rows "$rows" \
    --json "$out/row-attention-b$rows.json"
done

# Long prompts under depth-continuous batching: the time of one queue when its prefills stage
# 16, 8 (the default at 128-token prompts) or 1 prompt at a time (docs/sampling.md).
run "continuous-stage-rows-$model" "$py" benchmarks/continuous_stage_rows.py --preset "$model" \
  --stages 16,8,1 --json "$out/continuous-stage-rows-$model.json"

# Decoding tokens/s at r = 32, batch 1 and 64, against the measured memory bandwidth.
run "bench-sample-$model" "$py" -m rdlm bench sample "$model" --variants full,exit,shared \
  --batches 1,64 --steps 32 --new-tokens 32 --prompt-len 32 --json "$out/bench-sample-$model.json"

# A training step's MFU at r = 8 (and 32), one compilation for both.
run "bench-train-$(basename "$train_config" .yaml)" "$py" -m rdlm bench train "$train_config" \
  --recurrence 8,32 --steps 3 --warmup 1 --out "$out/bench-train-$(basename "$train_config" .yaml).json"
