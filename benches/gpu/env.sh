# Sourced by the one-call GPU scripts: unpacks the binaries carried in .gpu/ (built by
# build-cuda-binary.sh) into .gpu/bin, installs the carried wheels (diffusers) into /tmp/site
# and points LD_LIBRARY_PATH at the CUDA libraries PyTorch ships and at the driver.
# Expects to run from the repository root; sets OUT (default /tmp/gpu-out).
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT" .gpu/bin
for f in .gpu/*.xz; do
  python3 -c "import lzma,sys;open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" "$f" ".gpu/bin/$(basename "$f" .xz)"
done
chmod +x .gpu/bin/*
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl && export PYTHONPATH=/tmp/site
NV="$(python3 -c 'import nvidia,os;print(list(nvidia.__path__)[0])')"
LIBS="$(find "$NV" -name 'lib*.so*' -printf '%h\n' | sort -u | tr '\n' ':')"
export LD_LIBRARY_PATH="${LIBS}/usr/local/nvidia/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
