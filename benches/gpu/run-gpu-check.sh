#!/usr/bin/env bash
# One call on a lent GPU machine (no Rust toolchain there, so the CUDA binary is built
# elsewhere and carried in .gpu/ with the diffusers wheels):
#   1. environment: GPU, driver, NEEDED libraries of the binary;
#   2. every committed fixture case replayed on the GPU in f16 vs diffusers' f32 image;
#   3. an SD 1.5-architecture pipeline with random weights: diffusers fp16 vs ours fp16 on the
#      same files and the same latents, 512x512, 20 DDIM steps: timings and image parity.
# Results land in $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
BIN="$PWD/.gpu/jhakaas-worker"
if [ -f "$BIN.xz" ]; then python3 -c "import lzma,sys;open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$BIN.xz" "$BIN"; fi
chmod +x "$BIN"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl && export PYTHONPATH=/tmp/site
NV="$(python3 -c 'import nvidia,os;print(list(nvidia.__path__)[0])')"
LIBS="$(find "$NV" -name 'lib*.so*' -printf '%h\n' | sort -u | tr '\n' ':')"
export LD_LIBRARY_PATH="${LIBS}/usr/local/nvidia/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  uname -r
  python3 -c "import torch,diffusers,transformers;print('torch',torch.__version__,'diffusers',diffusers.__version__,'transformers',transformers.__version__)"
  ls -la "$BIN"
  ldd "$BIN"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== fixture cases on the GPU (f16) vs diffusers (CPU f32)"
python3 benches/gpu/fixture_parity.py "$BIN" cuda 2>&1 | tee "$OUT/fixture-parity.txt" | tail -n 4

echo "== SD 1.5 architecture, random weights, 512x512, 20 DDIM steps, CFG 7.5"
PROMPT="a photograph of an astronaut riding a horse on the moon"
python3 benches/gpu/sd15_random.py --out /tmp/sd15 --tokenizer tests/fixtures/models/sd1-tiny/tokenizer \
  --device cuda --size 512 --steps 20 --runs 3 > "$OUT/diffusers.json" 2> "$OUT/diffusers.err"
tail -n 3 "$OUT/diffusers.err"; cat "$OUT/diffusers.json"
TIMEFORMAT="wall %R s (process start to image written, model load included)"
for i in 1 2 3 4; do
  { time "$BIN" generate --model /tmp/sd15 --prompt "$PROMPT" --steps 20 --scheduler ddim --guidance-scale 7.5 \
      --latents /tmp/sd15/latents.safetensors --device cuda --output /tmp/sd15/ours.png ; } >> "$OUT/ours.txt" 2>&1
done
cat "$OUT/ours.txt"
python3 benches/gpu/compare_images.py /tmp/sd15/ours.png /tmp/sd15/diffusers.png | tee "$OUT/sd15-parity.txt"
cp /tmp/sd15/ours.png "$OUT/sd15-ours.png"; cp /tmp/sd15/diffusers.png "$OUT/sd15-diffusers.png"
