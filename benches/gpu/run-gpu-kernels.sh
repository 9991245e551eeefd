#!/usr/bin/env bash
# Issue 10's device check, in one call on a lent GPU machine (CUDA binaries and the kernel test
# binary from build-cuda-binary.sh, diffusers wheels, all carried in .gpu/). In order of value,
# so a run cut short still answers the first questions:
#   0. the torch-cuda generator: torch's own CUDA draws against ours (seconds; issue 22);
#   1. our CUDA kernels against their f32 references (tests/kernels.rs built --features cuda);
#      1b. the same tests under compute-sanitizer memcheck and racecheck, where the machine has
#      it (issue 24: what the CPU emulation in model-manager/cuda/emu/ cannot see);
#   2. the profile: one SD 1.5 UNet step at 512² (CFG batch 2) and one VAE decode split by
#      attention / conv / linear / norm / GEGLU / rest, host enqueue time, an 8×8-latent step —
#      for --kernels reference, auto and fused;
#   3. the SD 1.x/2.x fixture cases in f16 with --kernels fused vs diffusers' f32 images;
#   4. compare.py --device cuda: SD 1.5 512² 20 steps, then SDXL 1024² 20 steps, with the fused
#      kernels, diffusers fp16 alternated in the same run.
# Results land in $OUT (default /tmp/gpu-out). Budget: about 9 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/gpu/env.sh
. benches/gpu/env.sh
BIN="$PWD/.gpu/bin"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch,diffusers,transformers;print('torch',torch.__version__,'diffusers',diffusers.__version__,'transformers',transformers.__version__)"
  ls -la "$BIN"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
step() { echo "== $1 ($(date +%T))"; }

step "0. torch-cuda: torch.randn on the GPU vs our host Philox draws"
python3 benches/gpu/torch_cuda_randn.py .gpu/torch_cuda_ours.safetensors benches/gpu/torch_cuda_plan.json "$OUT" \
  > "$OUT/torch-cuda-randn.txt" 2>&1
tail -n 3 "$OUT/torch-cuda-randn.txt"

step "1. CUDA kernels vs their f32 references"
"$BIN/kernels-test" --nocapture --test-threads 1 cuda_ 2>&1 | tee "$OUT/kernel-tests.txt" | grep -E "^test |relative|result"

step "1b. compute-sanitizer memcheck and racecheck on the kernel tests"
sanitizer="$(command -v compute-sanitizer || true)"
for s in /usr/local/cuda*/bin/compute-sanitizer; do
  if [ -z "$sanitizer" ] && [ -x "$s" ]; then sanitizer="$s"; fi
done
if [ -n "$sanitizer" ]; then
  for tool in memcheck racecheck; do
    timeout 90 "$sanitizer" --tool "$tool" --error-exitcode 9 "$BIN/kernels-test" --test-threads 1 cuda_ \
      > "$OUT/compute-sanitizer-$tool.txt" 2>&1
    echo "$tool: exit $? (0 clean, 9 errors found, 124 cut at 90 s)"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|Race" "$OUT/compute-sanitizer-$tool.txt" | head -n 5
  done
else
  echo "no compute-sanitizer on this machine" | tee "$OUT/compute-sanitizer.txt"
fi

step "2. profile: SD 1.5 architecture, random weights, 512², fp16"
python3 benches/compare/make_model.py --arch sd15 --out /tmp/models/sd15 \
  --tokenizer tests/fixtures/models/sd1-tiny/tokenizer > "$OUT/make_model.log" 2>&1 || tail -n 20 "$OUT/make_model.log"
for k in reference auto fused; do
  "$BIN/jhakaas-profile" /tmp/models/sd15 512 cuda "$k" > "$OUT/profile-sd15-512-$k.json" 2> "$OUT/profile-$k.err" \
    && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], 'unet', d['unet_step'], 'vae', d['vae_decode']['total_s'], '8x8', d['unet_step_8x8_latent'])" \
       "$OUT/profile-sd15-512-$k.json" "$k" || tail -n 5 "$OUT/profile-$k.err"
done

step "3. SD 1.x/2.x fixture cases in f16 with --kernels fused"
JHAKAAS_KERNELS=fused python3 benches/gpu/fixture_parity.py "$BIN/jhakaas-worker" cuda ${FIXTURE_PIPELINES:-sd1-tiny sd2-tiny} \
  > "$OUT/fixture-parity-fused.txt" 2>&1
grep -E "FAILED|worst" "$OUT/fixture-parity-fused.txt" | tail -n 3

step "4a. compare: SD 1.5 512², 20 DDIM steps, fused kernels"
JHAKAAS_KERNELS=fused python3 benches/compare/compare.py --arch sd15 --size 512 --steps 20 --runs 3 --rounds 2 --device cuda \
  --models /tmp/models --target "$BIN" --results "$OUT" 2>&1 | tail -n 14

step "4b. compare: SDXL 1024², 20 DDIM steps, fused kernels"
python3 benches/compare/make_model.py --arch sdxl --out /tmp/models/sdxl \
  --tokenizer tests/fixtures/models/sd1-tiny/tokenizer >> "$OUT/make_model.log" 2>&1 || tail -n 20 "$OUT/make_model.log"
JHAKAAS_KERNELS=fused python3 benches/compare/compare.py --arch sdxl --size 1024 --steps 20 --runs 2 --rounds 1 --device cuda \
  --models /tmp/models --target "$BIN" --results "$OUT" 2>&1 | tail -n 14
step "done"
