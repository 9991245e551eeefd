#!/usr/bin/env bash
# Measures the images base-image/build.sh makes, on this machine, and writes the figures to
# RESULTS_DIR (default benches/results/DATE-images): layer sizes (uncompressed, gzip), OCI
# archive sizes, the recipe from nothing, a rerun with no change, the worker rebuild after a
# one-line code change (incremental cargo build + layer, CPU and CUDA) and the layer alone,
# and container start to SERVING (median of 5) for each baked model set.
# Usage (as root, after one normal build so that cargo's target dirs are warm):
#   benches/images/measure.sh [--model [NAME=]SOURCE]... [--no-cuda] [RESULTS_DIR]
# Needs podman and a python with grpcio + grpcio-health-checking ($JHAKAAS_PYTHON).
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"
models=() cuda=1 results=""
while [ $# -gt 0 ]; do
  case "$1" in
    --model) models+=(--model "$2"); shift 2 ;;
    --no-cuda) cuda=0; shift ;;
    *) results="$1"; shift ;;
  esac
done
results="${results:-benches/results/$(date -u +%F)-images}"
git diff --quiet worker/src/main.rs || { echo "worker/src/main.rs has changes: this script edits and restores it"; exit 1; }
mkdir -p "$results"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$root/.ci/containers.conf}"
python="${JHAKAAS_PYTHON:?set JHAKAAS_PYTHON to a python with grpcio-tools and grpcio-health-checking}"
scratch="$(mktemp -d)"
trap 'podman rm -f jhakaas-measure >/dev/null 2>&1 || true; git -C "$root" checkout -- worker/src/main.rs; rm -rf "$scratch"' EXIT
timings="$results/timings.tsv"
printf 'what\tseconds\n' > "$timings"
: > "$results/steps.txt"
timed() { # timed LABEL CMD...: runs CMD, appends its wall time
  local label="$1" t0 t1; shift
  t0="$(date +%s.%N)"; "$@" > "$scratch/last.log" 2>&1 || { cat "$scratch/last.log"; exit 1; }
  t1="$(date +%s.%N)"
  { echo "## $label"; grep '^== \[' "$scratch/last.log" || true; } >> "$results/steps.txt"
  awk -v l="$label" -v a="$t0" -v b="$t1" 'BEGIN { printf "%s\t%.1f\n", l, b - a }' | tee -a "$timings"
}
cuda_args=(); [ "$cuda" = 0 ] || cuda_args=(--cuda)
# The binaries of this commit, built before anything is timed (a build left by an earlier,
# interrupted run would otherwise be counted as part of the recipe).
build_binaries() {
  cargo build --release --locked -p jhakaas-worker
  if [ "$cuda" = 1 ]; then
    # shellcheck source=base-image/cuda-toolchain.sh source-path=SCRIPTDIR/../..
    (source base-image/cuda-toolchain.sh && cuda_toolchain_setup "" && cuda_cargo build --release --locked -p jhakaas-worker --features cuda)
  fi
}
build_binaries > "$scratch/build.log" 2>&1 || { cat "$scratch/build.log"; exit 1; }

# The recipe from nothing: a fresh layout and wheel cache, Debian from the mirror, the wheels
# from PyPI; the binaries as they are (cargo's cold builds are timed separately).
JHAKAAS_WHEEL_DIR="$scratch/wheels" timed "recipe from nothing (base + CPU worker${cuda_args[*]:+ + CUDA worker}), binaries built" \
  base-image/build.sh --out "$scratch/fresh" "${models[@]}" --no-load "${cuda_args[@]}"
rm -rf "$scratch/fresh"

out="$scratch/images"
timed "first build into the cache, loaded into podman, OCI archives written" \
  base-image/build.sh --out "$out" "${models[@]}" "${cuda_args[@]}" --archive
cp "$out/report.tsv" "$results/layers.tsv"
cp "$out/os-packages.txt" "$results/os-packages.txt"
find "$out/archives" -type f -printf '%f\t%s\n' | sort > "$results/archives.tsv"
timed "rerun, no change" base-image/build.sh --out "$out" "${models[@]}" "${cuda_args[@]}"

# A one-line code change that changes the binary: the CLI's description.
sed -i 's/about = "Stable Diffusion worker in pure Rust (candle)"/about = "Stable Diffusion worker in pure Rust (candle)."/' worker/src/main.rs
git diff --quiet worker/src/main.rs && { echo "the one-line change did not apply"; exit 1; }
timed "one-line change: cargo build + CPU worker layer + load" base-image/build.sh --out "$out" "${models[@]}"
if [ "$cuda" = 1 ]; then
  timed "one-line change: CUDA cargo build + CUDA worker layer + load" base-image/build.sh --out "$out" "${models[@]}" --no-cpu --cuda
fi
git checkout -- worker/src/main.rs
build_binaries > "$scratch/build.log" 2>&1 || { cat "$scratch/build.log"; exit 1; }
# The layer alone: a new binary (the same one with a byte appended), no cargo.
cp "${CARGO_TARGET_DIR:-target}/release/jhakaas-worker" "$scratch/bin" && printf '\0' >> "$scratch/bin"
timed "worker layer alone (new binary, no cargo) + load" base-image/build.sh --out "$out" "${models[@]}" --binary "$scratch/bin"
git diff --quiet worker/src/main.rs
base-image/build.sh --out "$out" "${models[@]}" > /dev/null 2>&1 # back to the committed binary

# Start to SERVING: `podman run` of the default command until the readiness question is
# answered SERVING, then one Generate; median of 5.
"$python" -m grpc_tools.protoc -I proto --python_out="$scratch" --grpc_python_out="$scratch" proto/jhakaas/worker/v1/worker.proto
default_model="$(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' localhost/jhakaas-worker:local-cpu \
  | sed -n 's/^JHAKAAS_MODELS=\([^=,]*\)=.*/\1/p')"
: > "$scratch/serving"
for _ in 1 2 3 4 5; do
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  started="$(date +%s.%N)"
  podman run -d --name jhakaas-measure --read-only -p "127.0.0.1:$port:50051" localhost/jhakaas-worker:local-cpu >/dev/null
  "$python" tests/python/image_client.py "$scratch" "127.0.0.1:$port" "$started" "$default_model" \
    | sed -n 's/^SERVING after \([0-9.]*\) s/\1/p' >> "$scratch/serving"
  podman stop --time 30 jhakaas-measure >/dev/null
  [ "$(podman inspect --format '{{.State.ExitCode}}' jhakaas-measure)" = 0 ]
  podman rm jhakaas-measure >/dev/null
done
printf 'podman run to SERVING, median of 5 (%s)\t%s\n' "$(tr '\n' ' ' < "$scratch/serving")" \
  "$(sort -n "$scratch/serving" | sed -n 3p)" | tee -a "$timings"

{
  echo "model name: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "cores: $(nproc)"
  echo "flags: $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2- | tr ' ' '\n' | grep -E '^(avx|avx2|avx512[a-z_]*|amx[a-z_]*|f16c|fma)$' | tr '\n' ' ')"
  echo "kernel: $(uname -r)"
  echo "rustc: $(rustc --version)"
  for t in mmdebstrap umoci skopeo podman; do echo "$t: $("$t" --version 2>&1 | head -n1)"; done
  echo "commit: $(git rev-parse HEAD)"
  echo "models: ${models[*]:-default (sd1-tiny fixture)}"
} > "$results/machine.txt"
echo "written to $results"
