#!/usr/bin/env bash
# The diffusers comparison in GPU mode, in one call on a lent GPU machine: fp16 on both sides,
# SD 1.5 architecture with random weights, 512x512, 20 DDIM steps. The CUDA binaries come
# from benches/gpu/build-cuda-binary.sh (carried in .gpu/ with the diffusers wheels); results
# (Markdown, JSON, SVG) land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/gpu/env.sh
. benches/gpu/env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 benches/compare/make_model.py --arch sd15 --out /tmp/models/sd15 \
  --tokenizer tests/fixtures/models/sd1-tiny/tokenizer 2>/dev/null
python3 benches/compare/compare.py --arch sd15 --size 512 --steps 20 --runs 3 --rounds 2 --device cuda \
  --models /tmp/models --target .gpu/bin --results "$OUT"
