#!/usr/bin/env bash
# The one recipe for the Jhakaas images: no registry base image, no Dockerfile, the same on a
# developer's Debian 12 machine, in CI and in Cloud Build (base-image/cloudbuild.yaml and
# worker/cloudbuild.yaml run it). Layers, in order, each a deterministic tar (names sorted,
# numeric owners, mtimes = SOURCE_DATE_EPOCH), so the same inputs give the same digests:
#   1. os      Debian bookworm, minbase (mmdebstrap; bookworm-security where reachable; no
#              docs, man pages or locales), user jhakaas 10001
#   2. cuda    the CUDA runtime libraries the CUDA binary links (cuBLAS, cuBLASLt, cuRAND), from
#              the NVIDIA wheels pinned by hash in cuda-runtime.txt, in /usr/local/cuda/lib64
#   3. weights the baked models, an HF cache under /opt/hf (hub ids fetched with `jhakaas-worker
#              fetch`, local diffusers folders laid out as cache entries `local/NAME`)
#      = localhost/jhakaas-base:local
#   4. worker  the binary alone: localhost/jhakaas-worker:local-cpu, and with --cuda
#              localhost/jhakaas-worker:local-cuda
# Each stage is kept in an OCI layout under --out, tagged by a hash of its inputs, so a rerun
# rebuilds only what changed (a code change: the binary and the worker layer). Nothing is
# built before every model has been fetched and checked.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: base-image/build.sh [options]    (as root unless --base: mmdebstrap runs as root)
  --model [NAME=]SOURCE   bake and serve a model (repeatable; the first is the default model):
                          a hub id org/name[@rev] or alias (sd-turbo, sdxl, ...) or a diffusers
                          folder. Default: sd1-tiny=tests/fixtures/models/sd1-tiny
  --model-vae NAME=SOURCE bake a VAE override for model NAME (JHAKAAS_MODEL_VAES)
  --fetch-variant V       fp16 (default) or fp32 weights where a repository has both
  --cuda                  also build the CUDA worker (binary built as base-image/cuda-toolchain.sh
                          does, for CUDA_COMPUTE_CAP, default 90)
  --no-cpu                do not build the CPU worker
  --base REF              put the worker layer on an existing base image instead of building one
                          (a skopeo reference, e.g. docker://REGISTRY/base:1.0.0)
  --binary PATH           use this CPU binary instead of building it (also --cuda-binary PATH)
  --out DIR               OCI layout, caches and reports (default ~/.cache/jhakaas/images)
  --refresh-os            rebuild the Debian layer from the mirror (security updates)
  --no-load               do not copy the images into the local container store
  --archive               also write each image as an OCI archive under DIR/archives
  --push REGISTRY         push base:VERSION, worker:VERSION-cpu and worker:VERSION-smNN with
  --version VERSION       skopeo (repeat --version for more tags; credentials from skopeo's auth
                          file, or JHAKAAS_REGISTRY_CREDS=user:password)
Environment: SOURCE_DATE_EPOCH (layer mtimes; fixed by default so that digests do not depend
on when or at which commit a layer was built), CUDA_COMPUTE_CAP, CARGO_TARGET_DIR,
JHAKAAS_DEBIAN_MIRROR, JHAKAAS_DEBIAN_SECURITY_MIRROR.
EOF
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models=() vaes=() versions=()
variant=fp16 want_cpu=1 want_cuda=0 base_ref="" cpu_binary="" cuda_binary=""
out="${JHAKAAS_IMAGE_DIR:-$HOME/.cache/jhakaas/images}"
refresh_os=0 load=1 archive=0 registry=""
while [ $# -gt 0 ]; do
  case "$1" in
    --model) models+=("$2"); shift 2 ;;
    --model-vae) vaes+=("$2"); shift 2 ;;
    --fetch-variant) variant="$2"; shift 2 ;;
    --cuda) want_cuda=1; shift ;;
    --no-cpu) want_cpu=0; shift ;;
    --base) base_ref="$2"; shift 2 ;;
    --binary) cpu_binary="$2"; shift 2 ;;
    --cuda-binary) cuda_binary="$2"; want_cuda=1; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --refresh-os) refresh_os=1; shift ;;
    --no-load) load=0; shift ;;
    --archive) archive=1; shift ;;
    --push) registry="$2"; shift 2 ;;
    --version) versions+=("$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument \`$1\` (see --help)" >&2; exit 2 ;;
  esac
done
fail() { echo "error: $*" >&2; exit 1; }
[ ${#models[@]} -gt 0 ] || models=("sd1-tiny=$root/tests/fixtures/models/sd1-tiny")
case "$variant" in fp16|fp32) ;; *) fail "--fetch-variant: \`$variant\` is not fp16 or fp32" ;; esac
[ -z "$registry" ] || [ ${#versions[@]} -gt 0 ] || fail "--push needs --version"
[ "$want_cpu" = 1 ] || [ "$want_cuda" = 1 ] || [ -z "$base_ref" ] || fail "--base without a worker to build"

# Not exported: cargo must see the environment CI's plain `cargo build` sees, or crates whose
# build scripts watch these variables (cc watches SOURCE_DATE_EPOCH) would rebuild every time.
SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1686355200}" # Debian 12.0's release day
CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
created="$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)"
mirror="${JHAKAAS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security_mirror="${JHAKAAS_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
# The libraries the CUDA binary links besides glibc and the driver's libcuda.so.1.
cuda_libs=(libcublas.so.13 libcublasLt.so.13 libcurand.so.10)
layout="$out/oci"
# Downloaded once per machine: the pinned wheels (hash-checked again on every use).
wheels="${JHAKAAS_WHEEL_DIR:-$HOME/.cache/jhakaas/wheels}"
mkdir -p "$out"
t_start=$SECONDS
step() { echo "== [$((SECONDS - t_start))s] $*"; }

# --- tools ----------------------------------------------------------------------------------
# command -> Debian package; installed with apt on Debian when missing, else named.
step "tools"
declare -A tool_pkg=([mmdebstrap]=mmdebstrap [umoci]=umoci [skopeo]=skopeo [curl]=curl [readelf]=binutils)
building_cuda=0
if [ "$want_cuda" = 1 ] && [ -z "$cuda_binary" ]; then building_cuda=1; fi
missing_pkgs=()
for t in "${!tool_pkg[@]}"; do command -v "$t" >/dev/null || missing_pkgs+=("${tool_pkg[$t]}"); done
# cargo links with `cc` (and the CUDA toolchain builds its libcuda stub with gcc).
if [ -z "$cpu_binary" ] || [ "$building_cuda" = 1 ]; then
  command -v cc >/dev/null && [ -e /usr/include/stdio.h ] || missing_pkgs+=(gcc libc6-dev)
fi
python3 -m pip --version >/dev/null 2>&1 || missing_pkgs+=(python3-pip)
if [ "$building_cuda" = 1 ] && ! python3 -m venv --help >/dev/null 2>&1; then missing_pkgs+=(python3-venv); fi
if [ ${#missing_pkgs[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing ${missing_pkgs[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}" >/dev/null
  else
    fail "missing tools; install the Debian packages ${missing_pkgs[*]} (or their equivalents)"
  fi
fi
if [ -z "$cpu_binary" ] || { [ "$want_cuda" = 1 ] && [ -z "$cuda_binary" ]; }; then
  command -v cargo >/dev/null || fail "cargo not found: install Rust $(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1) with rustup, or pass --binary"
fi

# --- helpers --------------------------------------------------------------------------------
sha() { sha256sum | cut -c1-64; }
# Part of every stage's key: a change to the recipe (e.g. a history text) rebuilds the stages,
# which then come out bit for bit as before wherever the change does not reach.
recipe_sha="$(sha < "$root/base-image/build.sh")"

# pack DIR TAR [root]: a deterministic layer tar of DIR's contents (not DIR itself); `root`
# makes every entry root-owned with no group/other write bits (the layers we stage ourselves).
pack() {
  local dir="$1" tarfile="$2" opts=()
  # shellcheck disable=SC2054 # the comma is tar's mode syntax
  [ "${3:-}" = root ] && opts=(--owner=0 --group=0 --mode=go-w,a+rX)
  (cd "$dir" && find . -mindepth 1 -printf '%P\0') | grep -zv '^dev/.' | LC_ALL=C sort -z \
    | tar --create --file="$tarfile" --directory="$dir" --null --no-recursion --files-from=- \
        --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" --format=posix \
        --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime "${opts[@]}"
  stat -c %s "$tarfile" > "$tarfile.size"
}

# (grep reads all of its input: with -q it could exit first, and pipefail would then report
# the writer's SIGPIPE as "no such tag".)
has_tag() { [ -f "$layout/index.json" ] && umoci ls --layout "$layout" | grep -x -- "$1" >/dev/null; }

# The digest of TAG's manifest (which covers its config and every layer): the next stage's key.
manifest_sha() { skopeo inspect --raw "oci:$layout:$1" | sha; }

# add_layer FROM TO TAR WHAT: TO = FROM plus the layer TAR (FROM empty: an image of that layer alone).
add_layer() {
  local from="$1" to="$2" tarfile="$3" what="$4"
  [ -f "$layout/index.json" ] || umoci init --layout "$layout"
  if [ -z "$from" ]; then
    from="empty"
    has_tag empty || { umoci new --image "$layout:empty"; umoci config --image "$layout:empty" --no-history --created "$created" --os linux --architecture amd64; }
  fi
  if has_tag "$to"; then umoci rm --image "$layout:$to"; gc_needed=1; fi
  umoci raw add-layer --image "$layout:$from" --tag "$to" "$tarfile" \
    --history.created "$created" --history.created_by "base-image/build.sh: $what"
  # Uncompressed sizes by diffID, for the report.
  echo "sha256:$(sha < "$tarfile") $(cat "$tarfile.size") $what" >> "$out/layer-sizes"
}

# retag STAGE TAG: keep only TAG among the tags named STAGE-*, then point STAGE at it.
gc_needed=0
retag() {
  local stage="$1" tag="$2" t
  for t in $(umoci ls --layout "$layout" | grep "^$stage-" || true); do
    if [ "$t" != "$tag" ]; then umoci rm --image "$layout:$t"; gc_needed=1; fi
  done
  umoci tag --image "$layout:$tag" "$stage"
}

# --- models: fetched and checked before any layer is built ---------------------------------
build_cpu_binary() {
  [ -z "$cpu_binary" ] || return 0
  step "cargo build --release -p jhakaas-worker"
  (cd "$root" && env -u SOURCE_DATE_EPOCH -u CUDA_COMPUTE_CAP cargo build --release --locked -p jhakaas-worker)
  cpu_binary="${CARGO_TARGET_DIR:-$root/target}/release/jhakaas-worker"
}

# bake NAME SOURCE: puts exactly the files `jhakaas-worker fetch --list` names for SOURCE into
# the staged HF cache $hub (blobs named by sha256, snapshot symlinks, refs/REF), fetching a hub
# model into the download cache $dl first; sets `baked` to the source the image serves it by.
bake() {
  local name="$1" src="$2" listing out_check repo ref commit d file path sum up sums=()
  if [ -d "$src" ]; then
    out_check="$("$cpu_binary" fetch --check "$src" 2>&1)" \
      || fail "--model $name=$src is not a complete diffusers pipeline or VAE folder: $out_check"
  else
    out_check="$(env -u HF_HUB_OFFLINE HF_HOME="$dl" "$cpu_binary" fetch --no-progress --variant "$variant" "$src" 2>&1)" \
      || fail "--model $name=$src cannot be fetched: $(tail -n 1 <<< "$out_check")"
    echo "$out_check"
  fi
  listing="$(env -u HF_HUB_OFFLINE HF_HOME="$dl" "$cpu_binary" fetch --list --variant "$variant" "$src")" \
    || fail "--model $name=$src: cannot list the files it needs"
  while IFS=$'\t' read -r file path; do
    [ -f "$path" ] || fail "--model $name=$src: $file is not on disk after fetching"
    sums+=("$(sha < "$path")")
  done <<< "$listing"
  if [ -d "$src" ]; then
    repo="local/$name" ref=main
    commit="$(paste -d' ' <(printf '%s\n' "${sums[@]}") <(cut -f1 <<< "$listing") | sha1sum | cut -c1-40)"
    baked="$repo"
  else
    path="$(head -n1 <<< "$listing" | cut -f2)"
    d="${path%%/snapshots/*}" commit="${path#*/snapshots/}"
    commit="${commit%%/*}" repo="$(basename "$d")"
    repo="${repo#models--}" repo="${repo/--//}" ref=main
    if [[ "$src" == *@* ]]; then ref="${src##*@}"; fi
    baked="$src"
  fi
  d="$hub/models--${repo//\//--}"
  mkdir -p "$d/blobs" "$d/refs" "$d/snapshots/$commit"
  printf '%s' "$commit" > "$d/refs/$ref"
  local i=0
  while IFS=$'\t' read -r file path; do
    sum="${sums[$i]}"; i=$((i + 1))
    path="$(readlink -f "$path")"
    [ -e "$d/blobs/$sum" ] || ln "$path" "$d/blobs/$sum" 2>/dev/null || cp "$path" "$d/blobs/$sum"
    mkdir -p "$(dirname "$d/snapshots/$commit/$file")"
    up="$(sed -E 's,[^/]+,..,g; s,\.\.$,,' <<< "$file")"
    ln -s "$up../../blobs/$sum" "$d/snapshots/$commit/$file"
    echo "$repo $commit $file $sum" >> "$work/weights.manifest"
  done <<< "$listing"
}

# stage_weights: every --model and --model-vae into $work/weights/opt/hf, then checked offline
# with the worker's own check, as the server will at start-up.
stage_weights() {
  local serving=() vae_env=() spec name src
  hub="$work/weights/opt/hf/hub" dl="$out/hf-$variant"
  mkdir -p "$hub" "$dl"
  for spec in "${models[@]}"; do
    name="${spec%%=*}" src="${spec#*=}"
    [ "$name" != "$spec" ] || name="$(basename "${src%@*}")"
    [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || fail "--model $spec: bad name \`$name\` (letters, digits, . _ -)"
    bake "$name" "$src"
    serving+=("$name=$baked")
  done
  for spec in "${vaes[@]}"; do
    name="${spec%%=*}" src="${spec#*=}"
    [ "$name" != "$spec" ] || fail "--model-vae $spec: expected NAME=SOURCE"
    grep -q "^$name=" <<< "$(printf '%s\n' "${serving[@]}")" || fail "--model-vae $spec: no --model named $name"
    bake "$name-vae" "$src"
    vae_env+=("$name=$baked")
  done
  models_env="$(IFS=,; echo "${serving[*]}")"
  vaes_env="$(IFS=,; echo "${vae_env[*]}")"
  step "checking the baked cache offline"
  # shellcheck disable=SC2046 # one argument per baked source
  HF_HOME="$work/weights/opt/hf" HF_HUB_OFFLINE=1 "$cpu_binary" fetch --check \
    $(printf '%s\n' "${serving[@]}" "${vae_env[@]}" | sed 's/^[^=]*=//') \
    || fail "the staged cache does not pass \`fetch --check\` (see above)"
  weights_key="$( { LC_ALL=C sort "$work/weights.manifest"; echo "$models_env|$vaes_env"; } | sha)"
}

work="$out/work"
rm -rf "$work"; mkdir -p "$work"
# The CPU binary runs `fetch` here, and is the CPU worker.
if [ "$want_cpu" = 1 ] || [ -z "$base_ref" ]; then build_cpu_binary; fi
if [ -z "$base_ref" ]; then
  step "weights: fetching and checking ${models[*]} ${vaes[*]}"
  stage_weights
fi

# --- CUDA binary (before any layer: a failed build leaves the layout as it was) ---------------
if [ "$want_cuda" = 1 ] && [ -z "$cuda_binary" ]; then
  step "cargo build --release -p jhakaas-worker --features cuda (compute capability $CUDA_COMPUTE_CAP)"
  # shellcheck source=base-image/cuda-toolchain.sh source-path=SCRIPTDIR/..
  source "$root/base-image/cuda-toolchain.sh"
  cuda_toolchain_setup ""
  cuda_cargo build --release --locked -p jhakaas-worker --features cuda
  cuda_binary="$cuda_target_dir/release/jhakaas-worker"
fi
if [ "$want_cuda" = 1 ]; then
  for lib in $(readelf -d "$cuda_binary" | awk '/NEEDED/ {gsub(/[][]/, "", $5); print $5}'); do
    case "$lib" in
      libc.so.*|libm.so.*|libgcc_s.so.*|ld-linux-*.so.*|libpthread.so.*|libdl.so.*|librt.so.*|libcuda.so.1) ;;
      *) grep -qx -- "$lib" <<< "$(printf '%s\n' "${cuda_libs[@]}")" \
           || fail "the CUDA binary needs $lib, which the CUDA layer does not ship (cuda_libs in base-image/build.sh)" ;;
    esac
  done
fi

# --- layers 1-3: the base -------------------------------------------------------------------
if [ -z "$base_ref" ]; then
  os_recipe="$recipe_sha $SOURCE_DATE_EPOCH $mirror $security_mirror"
  os_tag="os-$(echo "$os_recipe" | sha | cut -c1-16)"
  if [ "$refresh_os" = 1 ] || ! has_tag "$os_tag"; then
    step "layer 1: Debian bookworm (mmdebstrap)"
    [ "$(id -u)" = 0 ] || fail "run as root: mmdebstrap builds the Debian layer in a chroot (or pass --base)"
    sources=("deb $mirror bookworm main" "deb $mirror bookworm-updates main")
    if curl -fsS --max-time 20 -o /dev/null "$security_mirror/dists/bookworm-security/InRelease"; then
      sources+=("deb $security_mirror bookworm-security main")
    else
      echo "warning: $security_mirror is not reachable: the Debian layer has no security updates" >&2
    fi
    # shellcheck disable=SC2016 # "$1" is the hooks' argument, expanded by mmdebstrap
    SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" mmdebstrap --variant=minbase --mode=root --format=directory \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
      --dpkgopt='path-exclude=/usr/share/info/*' \
      --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
      --customize-hook='chroot "$1" useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin jhakaas' \
      --customize-hook='rm -f "$1"/etc/resolv.conf "$1"/etc/hostname' \
      --customize-hook='chroot "$1" dpkg-query -W -f "\${Package} \${Version}\n" > "$1/../os-packages.txt"' \
      bookworm "$work/os" "${sources[@]}" > "$work/mmdebstrap.log" 2>&1 \
      || { tail -n 30 "$work/mmdebstrap.log"; fail "mmdebstrap failed (log: $work/mmdebstrap.log)"; }
    pack "$work/os" "$work/os.tar"
    add_layer "" "$os_tag" "$work/os.tar" "Debian bookworm minbase, user jhakaas 10001"
    umoci config --image "$layout:$os_tag" --no-history --created "$created" \
      --config.user 10001:10001 --config.workingdir /home/jhakaas \
      --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --config.label "org.opencontainers.image.base.name=debian:bookworm (mmdebstrap)"
    cp "$work/os-packages.txt" "$out/os-packages.txt"
  fi
  retag os "$os_tag"

  cuda_tag="cuda-$( { echo "$recipe_sha"; manifest_sha "$os_tag"; cat "$root/base-image/cuda-runtime.txt"; echo "${cuda_libs[*]}"; } | sha | cut -c1-16)"
  if ! has_tag "$cuda_tag"; then
    step "layer 2: CUDA runtime libraries from the pinned NVIDIA wheels"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --platform manylinux_2_27_x86_64 --require-hashes -r "$root/base-image/cuda-runtime.txt" -d "$wheels"
    mkdir -p "$work/cuda/usr/local/cuda/lib64"
    python3 - "$work/cuda/usr/local/cuda/lib64" "$wheels" "$root/base-image/cuda-runtime.txt" "${cuda_libs[@]}" <<'PY'
import re, sys, zipfile, pathlib
dest, wheels, pins, wanted = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], set(sys.argv[4:])
for line in open(pins):
    m = re.match(r"([\w-]+)==([\w.]+)", line)
    if not m:
        continue
    name, version = m.group(1).replace("-", "_"), m.group(2)
    for wheel in wheels.glob(f"{name}-{version}-*.whl"):
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                base = info.filename.rsplit("/", 1)[-1]
                if base in wanted:
                    (dest / base).write_bytes(z.read(info))
                    wanted.discard(base)
if wanted:
    sys.exit(f"error: the wheels in {pins} lack {sorted(wanted)}")
PY
    chmod 0755 "$work/cuda/usr/local/cuda/lib64/"*
    pack "$work/cuda" "$work/cuda.tar" root
    add_layer "$os_tag" "$cuda_tag" "$work/cuda.tar" "CUDA runtime: ${cuda_libs[*]} ($(grep -o '^[a-z-]*==[0-9.]*' "$root/base-image/cuda-runtime.txt" | paste -sd' '))"
    # /usr/local/nvidia/lib64: where GKE mounts the node's driver (libcuda.so.1).
    umoci config --image "$layout:$cuda_tag" --no-history \
      --config.env LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/cuda/lib64 \
      --config.env NVIDIA_VISIBLE_DEVICES=all --config.env NVIDIA_DRIVER_CAPABILITIES=compute,utility
  fi
  retag cuda "$cuda_tag"

  base_tag="base-$( { echo "$recipe_sha"; manifest_sha "$cuda_tag"; echo "$weights_key"; } | sha | cut -c1-16)"
  if ! has_tag "$base_tag"; then
    step "layer 3: weights ($models_env)"
    pack "$work/weights" "$work/weights.tar" root
    add_layer "$cuda_tag" "$base_tag" "$work/weights.tar" "weights: $models_env${vaes_env:+; VAEs $vaes_env}"
    vae_opts=()
    [ -z "$vaes_env" ] || vae_opts=(--config.env "JHAKAAS_MODEL_VAES=$vaes_env")
    umoci config --image "$layout:$base_tag" --no-history \
      --config.env HF_HOME=/opt/hf --config.env HF_HUB_OFFLINE=1 \
      --config.env "JHAKAAS_MODELS=$models_env" "${vae_opts[@]}" \
      --config.label org.opencontainers.image.title=jhakaas-base \
      --config.label "org.opencontainers.image.description=Debian 12, CUDA runtime libraries and baked weights for jhakaas-worker" \
      --config.label "io.jhakaas.models=$models_env"
  fi
  retag base "$base_tag"
  base_image="$base_tag"
else
  step "base: $base_ref"
  [ -f "$layout/index.json" ] || umoci init --layout "$layout"
  skopeo copy --quiet ${JHAKAAS_REGISTRY_CREDS:+--src-creds "$JHAKAAS_REGISTRY_CREDS"} "$base_ref" "oci:$layout:base-ext"
  base_image="base-ext"
fi

# --- layer 4: the worker binary -------------------------------------------------------------
revision="${JHAKAAS_REVISION:-$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)}"
if [ "$revision" != unknown ] && [ -n "$(git -C "$root" status --porcelain 2>/dev/null)" ]; then
  revision="$revision-dirty"
fi
# The worker image says when its commit was made; its layer, like the others, is stamped
# SOURCE_DATE_EPOCH, so the same binary gives the same layer whatever the commit.
worker_created="$(date -u -d "@$(git -C "$root" log -1 --format=%ct 2>/dev/null || echo "$SOURCE_DATE_EPOCH")" +%Y-%m-%dT%H:%M:%SZ)"
worker_layer() {
  local kind="$1" binary="$2" tag version cap_label=()
  [ "$kind" = cpu ] || cap_label=(--config.label "io.jhakaas.cuda-compute-capability=$CUDA_COMPUTE_CAP")
  [ -x "$binary" ] || fail "the $kind binary $binary does not exist"
  version="$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version = "\(.*\)"/\1/p' "$root/Cargo.toml")"
  tag="worker-$kind-$( { echo "$recipe_sha"; manifest_sha "$base_image"; sha < "$binary"; echo "$kind $CUDA_COMPUTE_CAP $revision $worker_created"; } | sha | cut -c1-16)"
  if ! has_tag "$tag"; then
    step "layer 4: the $kind worker binary ($(numfmt --to=iec "$(stat -c %s "$binary")"))"
    rm -rf "$work/worker-$kind"; mkdir -p "$work/worker-$kind/usr/local/bin"
    cp "$binary" "$work/worker-$kind/usr/local/bin/jhakaas-worker"
    chmod 0755 "$work/worker-$kind/usr/local/bin/jhakaas-worker"
    pack "$work/worker-$kind" "$work/worker-$kind.tar" root
    add_layer "$base_image" "$tag" "$work/worker-$kind.tar" "jhakaas-worker $version ($kind)"
    umoci config --image "$layout:$tag" --no-history --created "$worker_created" \
      --config.entrypoint /usr/local/bin/jhakaas-worker --config.cmd serve \
      --config.env "JHAKAAS_DEVICE=$kind" \
      --config.exposedports 50051/tcp --config.exposedports 9090/tcp \
      --config.label org.opencontainers.image.title=jhakaas-worker \
      --config.label "org.opencontainers.image.description=Stable Diffusion worker in pure Rust ($kind)" \
      --config.label "org.opencontainers.image.version=$version" \
      --config.label "org.opencontainers.image.revision=$revision" "${cap_label[@]}"
  fi
  retag "worker-$kind" "$tag"
}
if [ "$want_cpu" = 1 ]; then worker_layer cpu "$cpu_binary"; fi
if [ "$want_cuda" = 1 ]; then worker_layer cuda "$cuda_binary"; fi
# Blobs no tag reaches any more are deleted. (umoci gc would do it, but it reads every blob:
# 14 s for the CUDA layer, on every code change.)
if [ "$gc_needed" = 1 ]; then
  python3 - "$layout" <<'PY'
import json, pathlib, sys
layout = pathlib.Path(sys.argv[1])
blobs = layout / "blobs" / "sha256"
keep = set()
for entry in json.loads((layout / "index.json").read_text())["manifests"]:
    manifest = json.loads((blobs / entry["digest"].split(":")[1]).read_text())
    if "config" not in manifest:  # an image index: only our layouts' plain manifests are walked here
        sys.exit("unexpected image index in the layout; run `umoci gc --layout %s`" % layout)
    keep |= {d["digest"] for d in [entry, manifest["config"], *manifest["layers"]]}
for blob in blobs.iterdir():
    if f"sha256:{blob.name}" not in keep:
        blob.unlink()
PY
fi

# --- load, archive, push, report ------------------------------------------------------------
images=()
[ -z "$base_ref" ] && images+=("base:localhost/jhakaas-base:local")
[ "$want_cpu" = 1 ] && images+=("worker-cpu:localhost/jhakaas-worker:local-cpu")
[ "$want_cuda" = 1 ] && images+=("worker-cuda:localhost/jhakaas-worker:local-cuda")
for entry in "${images[@]}"; do
  tag="${entry%%:*}" name="${entry#*:}"
  if [ "$load" = 1 ]; then
    step "loading $name"
    old_id="$(podman image inspect --format '{{.Id}}' "$name" 2>/dev/null || true)"
    skopeo copy --quiet "oci:$layout:$tag" "containers-storage:$name"
    # The image this one replaces, unless a container or another tag still holds it.
    if [ -n "$old_id" ] && [ "$old_id" != "$(podman image inspect --format '{{.Id}}' "$name")" ]; then
      podman rmi "$old_id" >/dev/null 2>&1 || true
    fi
  fi
  if [ "$archive" = 1 ]; then
    mkdir -p "$out/archives"; rm -f "$out/archives/$tag.oci.tar"
    skopeo copy --quiet "oci:$layout:$tag" "oci-archive:$out/archives/$tag.oci.tar:$name"
  fi
  for version in "${versions[@]}"; do
    case "$tag" in
      base) dest="$registry/base:$version" ;;
      worker-cpu) dest="$registry/worker:$version-cpu" ;;
      worker-cuda) dest="$registry/worker:$version-sm$CUDA_COMPUTE_CAP" ;;
    esac
    step "pushing $dest"
    skopeo copy --quiet ${JHAKAAS_REGISTRY_CREDS:+--dest-creds "$JHAKAAS_REGISTRY_CREDS"} "oci:$layout:$tag" "docker://$dest"
  done
done

# One line per layer of each image: what it holds, its bytes uncompressed and compressed, and
# its digests; then the manifest digest.
python3 - "$layout" "$out/layer-sizes" "${images[@]}" > "$out/report.tsv" <<'PY'
import json, pathlib, sys
layout, sizes_file, entries = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
sizes = {}
for line in open(sizes_file):
    diff_id, size, what = line.rstrip("\n").split(" ", 2)
    sizes[diff_id] = (int(size), what)
def blob(digest):
    return json.loads((layout / "blobs" / "sha256" / digest.split(":")[1]).read_text())
index = json.loads((layout / "index.json").read_text())["manifests"]
tags = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index}
print("image\tlayer\tuncompressed_bytes\tgzip_bytes\tdiff_id\tgzip_digest\tholds")
for entry in entries:
    tag, name = entry.split(":", 1)
    manifest = blob(tags[tag])
    config = blob(manifest["config"]["digest"])
    for i, (layer, diff_id) in enumerate(zip(manifest["layers"], config["rootfs"]["diff_ids"]), 1):
        size, what = sizes.get(diff_id, (-1, "(from the base image)"))
        print(f"{name}\t{i}\t{size}\t{layer['size']}\t{diff_id}\t{layer['digest']}\t{what}")
    print(f"{name}\tmanifest\t\t\t{tags[tag]}\t\tconfig {manifest['config']['digest']}")
PY
rm -rf "$work"
step "done: $out/report.tsv"
awk -F'\t' '{ printf "%-36s %-8s %12s %12s  %s\n", $1, $2, $3, $4, $7 }' "$out/report.tsv" | cut -c1-200
