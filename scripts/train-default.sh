#!/usr/bin/env bash
# Train the shipped default model set (weights/shapes-small) from scratch on the procedural shapes data.
#
#   scripts/train-default.sh OUT_DIR [MINUTES_SCALE]
#
# Two lanes run side by side, one CPU thread each (sized for a 2-core CPU):
#   lane A: clip -> embedding cache -> decoder
#   lane B: upsampler-256 -> upsampler-1024 -> prior (once the cache exists) -> prior-ar
#           -> more upsampler-256 -> more upsampler-1024
# Every stage is time-boxed with `timeout -s TERM` (training stops after the current step and saves
# its EMA weights and a resumable state); `unclip train ... --steps N` with the steps a run reached
# reproduces its weights (same device and thread count). Rerunning the script resumes every stage
# from its state. It trains the small preset: a 64 px CLIP with hard negatives, and a decoder and
# upsamplers that predict x0. `unclip model export OUT_DIR -o DEST` then copies what ships.
set -euo pipefail
out=${1:?usage: train-default.sh OUT_DIR [MINUTES_SCALE]}
scale=${2:-1}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mins() { python3 -c "print(int($1 * $scale * 60))"; }
boxed() {  # run "$@" for at most $1 seconds; a time-out (124) or a stop on signal (130) is fine
  local secs=$1 rc=0; shift
  timeout -s TERM "$secs" "$@" || rc=$?
  [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ]
}
common=(--model "$out" -q --save-every 250 --ema-decay 0.999 --warmup 200)

[ -f "$out/model.json" ] || unclip model init --preset small -o "$out" --name shapes-small --seed 0

lane_a() {
  boxed "$(mins 40)" unclip train clip --data shapes --steps 100000 --batch-size 128 --lr 5e-4 --hard-negatives 4 "${common[@]}"
  [ -f "$out/cache.safetensors" ] || unclip data embed --model "$out" --data shapes --count 40000 -o "$out/cache.safetensors" -q
  boxed "$(mins 80)" unclip train decoder --data shapes --cache "$out/cache.safetensors" --steps 1000000 \
    --batch-size 16 --lr 3e-4 "${common[@]}"
}

lane_b() {
  boxed "$(mins 25)" unclip train upsampler-256 --data shapes --steps 1000000 --batch-size 16 --lr 3e-4 "${common[@]}"
  boxed "$(mins 15)" unclip train upsampler-1024 --data shapes --steps 1000000 --batch-size 4 --lr 3e-4 "${common[@]}"
  while [ ! -f "$out/cache.safetensors" ]; do sleep 10; done
  boxed "$(mins 15)" unclip train prior --cache "$out/cache.safetensors" --steps 1000000 --batch-size 128 --lr 3e-4 "${common[@]}"
}

lane_c() {  # after lane B: the AR prior, then more steps for both upsamplers
  [ -d "$out/prior-ar" ] || unclip model add prior-ar --model "$out" --preset small
  boxed "$(mins 8)" unclip train prior-ar --cache "$out/cache.safetensors" --steps 1000000 --batch-size 128 --lr 3e-4 "${common[@]}"
  boxed "$(mins 35)" unclip train upsampler-256 --data shapes --steps 1000000 --batch-size 16 --lr 3e-4 "${common[@]}"
  boxed "$(mins 25)" unclip train upsampler-1024 --data shapes --steps 1000000 --batch-size 4 --lr 3e-4 "${common[@]}"
}

lane_a > "$out/lane-a.log" 2>&1 &
a=$!
{ lane_b && lane_c; } > "$out/lane-b.log" 2>&1 &
b=$!
wait $a $b
echo "done: $out"

