#!/usr/bin/env bash
# The diffusers comparison in GPU mode, in one call on a lent GPU machine: fp16 on both sides,
# SD 1.5 architecture with random weights, 512x512, 20 DDIM steps. The CUDA binaries come
# from benches/gpu/build-cuda-binary.sh (carried in .gpu/ with the diffusers wheels); results
# (Markdown, JSON, SVG) land in $OUT.
set -euo pipefail
OUT="${OUT:-/tmp/gpu-out}"
cd "$(dirname "$0")/../.."
mkdir -p "$OUT" .gpu/bin
for f in .gpu/*.xz; do
  python3 -c "import lzma,sys;open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$f" ".gpu/bin/$(basename "$f" .xz)"
done
chmod +x .gpu/bin/*
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl && export PYTHONPATH=/tmp/site
NV="$(python3 -c 'import nvidia,os;print(list(nvidia.__path__)[0])')"
LIBS="$(find "$NV" -name 'lib*.so*' -printf '%h\n' | sort -u | tr '\n' ':')"
export LD_LIBRARY_PATH="${LIBS}/usr/local/nvidia/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 benches/compare/make_model.py --arch sd15 --out /tmp/models/sd15 \
  --tokenizer tests/fixtures/models/sd1-tiny/tokenizer 2>/dev/null
python3 benches/compare/compare.py --arch sd15 --size 512 --steps 20 --runs 3 --rounds 2 --device cuda \
  --models /tmp/models --target .gpu/bin --results "$OUT"
