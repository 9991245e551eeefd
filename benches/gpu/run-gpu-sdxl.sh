#!/usr/bin/env bash
# SDXL on a lent GPU machine, in one call (binaries from build-cuda-binary.sh and the diffusers
# wheels carried in .gpu/):
#   1. the SDXL-family and turbo fixture cases replayed on the GPU in f16 vs diffusers' CPU f32
#      images (FIXTURE_PIPELINES="sd1-tiny …" adds the SD 1.x/2.x ones);
#   2. an SDXL base 1.0-architecture pipeline with random weights (make_model.py --arch sdxl,
#      initialised on the GPU): diffusers fp16 vs ours fp16 on the same files and latents,
#      1024x1024, 20 DDIM steps, CFG 7.5 — timings per stage, cold start, RSS, gRPC, parity;
#   3. the same model with a VAE that does not need the f32 upcast (force_upcast false, like
#      madebyollin/sdxl-vae-fp16-fix) passed with --vae: decode time and that the image changes
#      only by f16 rounding.
# Results land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/gpu/env.sh
. benches/gpu/env.sh
BIN="$PWD/.gpu/bin/jhakaas-worker"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch,diffusers,transformers;print('torch',torch.__version__,'diffusers',diffusers.__version__,'transformers',transformers.__version__)"
  ls -la "$BIN"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== fixture cases on the GPU (f16) vs diffusers (CPU f32)"
python3 benches/gpu/fixture_parity.py "$BIN" cuda ${FIXTURE_PIPELINES:-sdxl-tiny sdxl-turbo-tiny sd-turbo-tiny} > "$OUT/fixture-parity.txt" 2>&1
grep -E "FAILED|worst" "$OUT/fixture-parity.txt"; grep -E "^sdxl|^sd-turbo" "$OUT/fixture-parity.txt" | sort -t' ' -k5 -n | tail -n 3

echo "== SDXL architecture, random weights, 1024x1024, 20 DDIM steps, CFG 7.5, fp16"
python3 benches/compare/make_model.py --arch sdxl --out /tmp/models/sdxl \
  --tokenizer tests/fixtures/models/sd1-tiny/tokenizer > "$OUT/make_model.log" 2>&1 || tail -n 20 "$OUT/make_model.log"
du -sh /tmp/models/sdxl/* | tee -a "$OUT/env.txt"
python3 benches/compare/compare.py --arch sdxl --size 1024 --steps 20 --runs 2 --rounds 1 --device cuda \
  --models /tmp/models --target .gpu/bin --results "$OUT" 2>&1 | tail -n 16

echo "== --vae with a VAE that skips the f32 upcast (force_upcast false)"
python3 - <<'PY'
import json, shutil
shutil.copytree("/tmp/models/sdxl/vae", "/tmp/models/vae-fp16", dirs_exist_ok=True)
cfg = json.load(open("/tmp/models/vae-fp16/config.json")); cfg["force_upcast"] = False
json.dump(cfg, open("/tmp/models/vae-fp16/config.json", "w"))
PY
PROMPT="a photograph of an astronaut riding a horse on the moon"
for vae in "" "--vae /tmp/models/vae-fp16"; do
  # shellcheck disable=SC2086
  "$BIN" generate --model /tmp/models/sdxl $vae --prompt "$PROMPT" --steps 20 --scheduler ddim \
    --guidance-scale 7.5 --latents /tmp/models/sdxl/latents-1024.safetensors --device cuda \
    --output "/tmp/models/vae${vae:+-fp16}.png" 2>&1 | grep -E "decode|error" | tee -a "$OUT/vae-override.txt"
done
python3 benches/gpu/compare_images.py /tmp/models/vae.png /tmp/models/vae-fp16.png | tee -a "$OUT/vae-override.txt"
