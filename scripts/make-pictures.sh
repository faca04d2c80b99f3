#!/usr/bin/env bash
# The README's and the model card's pictures, made with the shipped default set (CPU, ~2 minutes).
#   scripts/make-pictures.sh   (writes docs/*.png and weights/shapes-small/crop-1024.png)
set -euo pipefail
cd "$(dirname "$0")/.."
d=docs; tmp=$(mktemp -d)
unclip generate "a large red star on a blue background" --size 1024 --seed 0 -q -o "$tmp/star1024.png"
python3 - "$tmp/star1024.png" weights/shapes-small/crop-1024.png <<'PY'
import sys
from PIL import Image
im = Image.open(sys.argv[1])
im.crop((384, 384, 640, 640)).save(sys.argv[2])  # a 256x256 crop at full resolution
PY
unclip generate "a large red circle on a blue background" "a yellow square left of a green ring on a white background" \
  "a medium purple triangle on a orange background" --size 256 --seed 1 -q -o "$tmp/gen.png"
python3 - "$tmp" "$d/generate.png" <<'PY'
import sys
from PIL import Image
ims = [Image.open(f"{sys.argv[1]}/gen-{i}.png") for i in range(3)]
strip = Image.new("RGB", (256 * 3, 256))
for i, im in enumerate(ims):
    strip.paste(im, (256 * i, 0))
strip.save(sys.argv[2])
PY
unclip generate "a large red circle on a blue background" --size 64 --seed 3 -q -o "$tmp/a.png"
unclip generate "a large yellow square on a green background" --size 64 --seed 4 -q -o "$tmp/b.png"
unclip interpolate "$tmp/a.png" "$tmp/b.png" -n 6 --invert -q -o "$d/interpolate.png"
unclip text-diff "$tmp/a.png" --from "a large red circle on a blue background" --to "a large red star on a blue background" \
  -n 5 --max-theta 0.5 -q -o "$d/text-diff.png"
unclip vary "$tmp/a.png" -n 4 --eta 1 --seed 0 -q -o "$tmp/v.png"
python3 - "$tmp" "$d/vary.png" <<'PY'
import sys
from PIL import Image
ims = [Image.open(f"{sys.argv[1]}/a.png")] + [Image.open(f"{sys.argv[1]}/v-{i}.png") for i in range(4)]
strip = Image.new("RGB", (64 * 5, 64))
for i, im in enumerate(ims):
    strip.paste(im, (64 * i, 0))
strip.save(sys.argv[2])
PY
rm -rf "$tmp"
ls -la "$d" weights/shapes-small/crop-1024.png
