#!/usr/bin/env bash
# Train a default model set on a lent GPU within one device command (at most 10 minutes there), so
# that a session of the device tool (15 minutes of device time, machine start included) can run it
# once, bring the weights back and judge them.
#
#   scripts/train-device.sh SET_DIR OUT_DIR [TRAIN_SECONDS]
#
# SET_DIR is created if absent: the small preset (64 px CLIP, trained from scratch with hard
# negatives) with the shipped set's decoder and upsamplers as starting weights (the decoder's CLIP
# embedding width is the same, so it is fine-tuned onto the new CLIP). If SET_DIR already holds a
# set (a previous run's weights unpacked into it), every component trains on from its weights; the
# CLIP then keeps its weights unless TRAIN_CLIP=1. Three lanes share the GPU for TRAIN_SECONDS
# (default 400), each stage under `timeout -s TERM` (training saves after its current step):
#   lane A: clip (30%, fresh sets or TRAIN_CLIP=1) -> decoder (the rest), on the fly: it runs the
#           set's CLIP on each rendered batch, so it starts at once and never sees a scene twice
#   lane B: waits for the clip stage -> embedding cache (CACHE_COUNT scenes; its CPU-side
#           preprocessing takes about 1 s per 1,024) -> diffusion prior (65% of the time then
#           left) -> AR prior (the rest)
#   lane C: upsampler-1024 on whole 1024 px images with a wide color jitter (the whole time;
#           the model card explains why crops do not fix its PSNR)
# Then the weights, configs and logs are packed into OUT_DIR/set-*.tar, each under the device tool's
# 16 MiB a file (no training states: a next run starts afresh from the weights), and
# `unclip eval --count EVAL_COUNT --seed 0 --upsamplers` writes OUT_DIR/eval.txt.
#
# On the device (its python3 holds torch, typer, rich, timm, regex; open_clip_torch, ftfy and wcwidth
# travel as wheels: see the device tool's README for `pip download` into .whl/, carried), to train on
# a copy of the shipped set:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site && cp -r weights/shapes-small /tmp/set &&
#   OMP_NUM_THREADS=4 TRAIN_SECONDS=470 bash scripts/train-device.sh /tmp/set "$OUT"
# The working tree that travels must stay under the device tool's 64 MiB (a second 32 MiB set in the
# repository would pass it). Back here, unpack the tars and copy what ships with `unclip model export`:
#   mkdir -p set && for f in FILES_AT/set-*.tar; do tar -xf "$f" -C set; done
#   unclip model export set -o weights/shapes-small --default
#
# Batch sizes, learning rates, the eval size and a cap on each stage's steps are variables below
# (override from the environment); tests/test_train.py runs it for a few steps on the CPU. A smoke
# run on the CPU: UNCLIP_DEVICE=cpu TRAIN_SECONDS=60 CLIP_BATCH=32 \
#   DECODER_BATCH=4 PRIOR_BATCH=32 UP_BATCH=1 EVAL_COUNT=4 scripts/train-device.sh /tmp/s /tmp/o
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
set_dir=$(realpath -m "${1:?usage: train-device.sh SET_DIR OUT_DIR [TRAIN_SECONDS]}")
out=$(realpath -m "${2:?usage: train-device.sh SET_DIR OUT_DIR [TRAIN_SECONDS]}")
total=${3:-${TRAIN_SECONDS:-400}}
: "${CLIP_BATCH:=512}" "${CLIP_LR:=5e-4}" "${DECODER_BATCH:=256}" "${DECODER_LR:=3e-4}"
: "${PRIOR_BATCH:=512}" "${PRIOR_LR:=3e-4}" "${UP_BATCH:=8}" "${UP_LR:=1e-4}"
: "${CACHE_COUNT:=100000}" "${EVAL_COUNT:=200}" "${SEED:=0}"
: "${MAX_STEPS:=1000000}" "${LOG_EVERY:=50}"  # a stage ends at its time box or after MAX_STEPS steps
py=${PYTHON:-python3}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
unclip=("$py" -m unclip_cli)  # a command, not a shell function, so that `timeout` can run it
secs() { "$py" -c "print(max(1, int($1 * $total)))"; }
left() {  # seconds to the end of training, or PERCENT of them; at least 1
  local l=$(((start + total - $(date +%s)) * ${1:-100} / 100)); echo $((l > 1 ? l : 1))
}
boxed() {  # run "$@" for at most $1 seconds; a time-out (124) or a stop on signal (130) is fine
  local s=$1 rc=0; shift
  timeout -s TERM "$s" "$@" || rc=$?
  [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ]
}
common=(--model "$set_dir" -q --save-every 250 --log-every "$LOG_EVERY" --ema-decay 0.999 --seed "$SEED")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}  # three training processes share the machine's cores
mkdir -p "$out"
start=$(date +%s)

fresh=0
if [ ! -f "$set_dir/model.json" ]; then
  fresh=1
  "${unclip[@]}" model init --preset small -o "$set_dir" --name shapes-small --seed "$SEED"
  for c in decoder upsampler-256 upsampler-1024; do
    cp "$root/weights/shapes-small/$c/model.safetensors" "$set_dir/$c/"
  done
fi
rm -f "$set_dir/cache.safetensors" "$set_dir/clip-done.tmp"

lane_a() {
  trap 'touch "$set_dir/clip-done.tmp"' EXIT  # lane B must not wait forever if this lane fails early
  if [ "$fresh" = 1 ] || [ "${TRAIN_CLIP:-0}" = 1 ]; then
    boxed "$(secs 0.3)" "${unclip[@]}" train clip --data shapes --steps "$MAX_STEPS" --batch-size "$CLIP_BATCH" \
      --lr "$CLIP_LR" --hard-negatives 4 --warmup 200 "${common[@]}"
  fi
  touch "$set_dir/clip-done.tmp"
  boxed "$(left)" "${unclip[@]}" train decoder --data shapes --steps "$MAX_STEPS" --batch-size "$DECODER_BATCH" \
    --lr "$DECODER_LR" --warmup 200 "${common[@]}"
}

lane_b() {
  while [ ! -f "$set_dir/clip-done.tmp" ]; do sleep 2; done
  "${unclip[@]}" data embed --model "$set_dir" --data shapes --count "$CACHE_COUNT" --batch-size 1024 \
    -o "$set_dir/cache.safetensors" -q
  boxed "$(left 65)" "${unclip[@]}" train prior --cache "$set_dir/cache.safetensors" \
    --steps "$MAX_STEPS" --batch-size "$PRIOR_BATCH" --lr "$PRIOR_LR" --warmup 200 "${common[@]}"
  boxed "$(left)" "${unclip[@]}" train prior-ar --cache "$set_dir/cache.safetensors" --steps "$MAX_STEPS" \
    --batch-size "$PRIOR_BATCH" --lr "$PRIOR_LR" --warmup 200 "${common[@]}"
}

lane_c() {
  boxed "$total" "${unclip[@]}" train upsampler-1024 --data shapes --steps "$MAX_STEPS" --batch-size "$UP_BATCH" \
    --lr "$UP_LR" --crop 1024 --color-jitter 0.3 --warmup 25 "${common[@]}"
}

lane_a > "$out/lane-a.log" 2>&1 & a=$!
lane_b > "$out/lane-b.log" 2>&1 & b=$!
lane_c > "$out/lane-c.log" 2>&1 & c=$!
rc=0
wait $a || rc=1
wait $b || rc=1
wait $c || rc=1
echo "training: $(($(date +%s) - start)) s (lanes ok: $([ $rc = 0 ] && echo yes || echo no))"

for comp in clip prior prior-ar decoder upsampler-1024; do
  tail -n 1 "$set_dir/$comp/train.jsonl" 2>/dev/null | sed "s/^/$comp: /" || echo "$comp: no log"
done

# weights, configs and logs; each tar stays under 16 MiB (the decoder alone is ~13 MiB in fp32)
pack() {
  local name=$1; shift
  (cd "$set_dir" && tar -cf "$out/$name" --exclude='train-state.pt' --exclude='*.tmp*' "$@")
}
pack set-1.tar model.json clip
pack set-2.tar prior prior-ar
pack set-3.tar decoder
pack set-4.tar upsampler-256 upsampler-1024
# packed before the eval, so that the weights come back even if the device command's time runs out during it
"${unclip[@]}" eval --model "$set_dir" --count "$EVAL_COUNT" --seed 0 --upsamplers -q 2>&1 | tee "$out/eval.txt" || rc=1
ls -l "$out"
exit $rc
