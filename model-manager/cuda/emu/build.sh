#!/usr/bin/env bash
# Builds the CPU emulation's harness with model-manager/cuda/*.cu compiled unchanged by g++, in
# the modes asked for (default: all three):
#   plain  shared memory poisoned before every block (for the three thread orders)
#   asan   AddressSanitizer: out-of-bounds global and shared accesses
#   tsan   ThreadSanitizer: every CUDA thread a TSan fiber, happens-before only at barriers
# Usage: build.sh OUT_DIR [plain] [asan] [tsan]  ->  OUT_DIR/MODE/jhakaas-cuda-emu
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# JHAKAAS_CUDA_SRC: another folder of .cu files (the mutation check builds mutants with it).
cuda="${JHAKAAS_CUDA_SRC:-$(dirname "$here")}"
out="${1:?usage: build.sh OUT_DIR [plain] [asan] [tsan]}"
shift
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(plain asan tsan)
CXX="${CXX:-g++}"
common=(-std=gnu++17 -O2 -g -Wall -Wno-unknown-pragmas -I "$here/include" -I "$here")
# Our kernels are built for compute capability 8.0+ (attention.cu refuses anything older).
arch=(-D__CUDA_ARCH__=800)

mkdir -p "$out/gen"
# Each .cu plus one registration line per `extern "C"` kernel it defines (found with nm).
for cu in "$cuda"/*.cu; do
  k="$(basename "$cu" .cu)"
  "$CXX" "${common[@]}" "${arch[@]}" -x c++ -c "$cu" -o "$out/gen/$k.probe.o"
  {
    echo "#include \"$cu\""
    nm --defined-only -g "$out/gen/$k.probe.o" | awk '$2 == "T" && $3 !~ /^_Z/ { print "JHAKAAS_EMU_KERNEL(" $3 ")" }'
  } >"$out/gen/$k.cpp"
  grep -q JHAKAAS_EMU_KERNEL "$out/gen/$k.cpp" || { echo "no kernels found in $cu" >&2; exit 1; }
done

for mode in "${modes[@]}"; do
  case "$mode" in
    # Each kernel static in its own section, gathered by shared.ld for the runtime to poison.
    plain) kflags=(-fdata-sections); rflags=(-DJHAKAAS_EMU_POISON_SHARED); link=("-Wl,-T,$here/shared.ld") ;;
    asan) kflags=(-fsanitize=address -fno-omit-frame-pointer); rflags=(-DJHAKAAS_EMU_ASAN "${kflags[@]}"); link=(-fsanitize=address) ;;
    # The runtime and the harness stay uninstrumented: only the kernels' accesses are checked.
    tsan) kflags=(-fsanitize=thread); rflags=(-DJHAKAAS_EMU_TSAN); link=(-fsanitize=thread) ;;
    *) echo "unknown mode $mode (plain, asan, tsan)" >&2; exit 1 ;;
  esac
  dir="$out/$mode"
  mkdir -p "$dir"
  objs=()
  for gen in "$out"/gen/*.cpp; do
    k="$(basename "$gen" .cpp)"
    "$CXX" "${common[@]}" "${arch[@]}" "${kflags[@]}" -c "$gen" -o "$dir/$k.o"
    objs+=("$dir/$k.o")
  done
  "$CXX" "${common[@]}" "${rflags[@]}" -c "$here/runtime.cpp" -o "$dir/runtime.o"
  "$CXX" "${common[@]}" "${rflags[@]}" -c "$here/harness.cpp" -o "$dir/harness.o"
  "$CXX" "${link[@]}" -o "$dir/jhakaas-cuda-emu" "$dir/harness.o" "$dir/runtime.o" "${objs[@]}"
done
