#!/usr/bin/env bash
# Is an fp16 image difference on a random-weight SDXL pipeline ours, or the model's own
# sensitivity to fp16 rounding? Generates with diffusers fp16, diffusers fp32 and us (fp16) at
# 1 and 20 DDIM steps, 1024², and compares every pair. Results in $OUT/precision.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/gpu/env.sh
. benches/gpu/env.sh
BIN="$PWD/.gpu/bin/jhakaas-worker"
M=/tmp/models/sdxl
python3 benches/compare/make_model.py --arch sdxl --out $M --tokenizer tests/fixtures/models/sd1-tiny/tokenizer > /dev/null 2>&1
python3 -c "import torch; from safetensors.torch import save_file; save_file({'latents': torch.randn((1,4,128,128), generator=torch.Generator().manual_seed(0))}, '$M/latents.safetensors')"
python3 benches/gpu/precision_probe.py $M $M/latents.safetensors 1024 "$OUT" 1 20 2>&1 | grep -v Warning | tail -n 3
for steps in 1 20; do
  "$BIN" generate --model $M --prompt "a photograph of an astronaut riding a horse on the moon" --steps $steps \
    --scheduler ddim --guidance-scale 7.5 --latents $M/latents.safetensors --device cuda \
    --output "$OUT/ours-fp16-$steps.png" 2>&1 | grep -E "error" || true
  for pair in "ours-fp16 diffusers-fp16" "ours-fp16 diffusers-fp32" "diffusers-fp16 diffusers-fp32"; do
    set -- $pair
    echo "$steps steps: $1 vs $2: $(python3 benches/gpu/compare_images.py "$OUT/$1-$steps.png" "$OUT/$2-$steps.png")"
  done
done | tee "$OUT/precision.txt"
python3 -c "
import numpy as np, glob; from PIL import Image
for f in sorted(glob.glob('$OUT/*.png')):
    a = np.asarray(Image.open(f)).astype(float); print(f.split('/')[-1], 'mean %.1f std %.1f' % (a.mean(), a.std()))
" | tee -a "$OUT/precision.txt"
