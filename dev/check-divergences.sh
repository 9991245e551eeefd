#!/usr/bin/env bash
# Reintroduces, one at a time, each way candle's own SDXL path departs from diffusers and
# reports which tests catch it. Runs in a scratch git worktree of HEAD, so the checkout is
# never touched. Usage: dev/check-divergences.sh   (about 2 minutes per divergence here)
set -euo pipefail
repo=$(git rev-parse --show-toplevel)
scratch=$(mktemp -d /tmp/jhakaas-divergence.XXXXXX)
trap 'git -C "$repo" worktree remove --force "$scratch" >/dev/null 2>&1 || true' EXIT
git -C "$repo" worktree add --detach "$scratch" HEAD >/dev/null
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/jhakaas/target-divergence}

# name | file | original text | replacement (perl literal substitution)
divergences=(
  "added time/text conditioning ignored (add_embedding unused)|model-manager/src/unet/mod.rs|(temb + aug)?|{ let _ = aug; temb }"
  "last instead of penultimate text-encoder layer|model-manager/src/text.rs|(HiddenLayer::Penultimate, index.force_zeros_for_empty_prompt)|(HiddenLayer::Last, index.force_zeros_for_empty_prompt)"
  "text_encoder_2's text_projection never applied|model-manager/src/clip.rs|Some(proj.forward(&Tensor::cat(&pooled, 0)?)?)|{ let _ = proj; Some(Tensor::cat(&pooled, 0)?) }"
  "VAE decoded with SD's 0.18215 instead of the config's scaling_factor|model-manager/src/pipeline/generate.rs|self.vae.config().scaling_factor|0.18215"
)

for d in "${divergences[@]}"; do
  IFS='|' read -r name file from to <<<"$d"
  git -C "$scratch" checkout -q -- .
  FROM="$from" TO="$to" perl -0pi -e 's/\Q$ENV{FROM}\E/$ENV{TO}/g' "$scratch/$file"
  if git -C "$scratch" diff --quiet; then
    echo "!! could not reintroduce: $name (pattern not found in $file)"; exit 1
  fi
  echo "== $name"
  log=$(mktemp)
  (cd "$scratch" && cargo test -p jhakaas-model-manager --test parity_xl \
      ; cargo test -p jhakaas-tests --test generate_parity -- sdxl sd_turbo) >"$log" 2>&1 || true
  failed=$(grep -E "^test .* FAILED$|^error\[" "$log" | sed 's/^test /   FAILS: /; s/ \.\.\. FAILED$//' || true)
  if [ -z "$failed" ]; then echo "   NOT CAUGHT"; else echo "$failed"; fi
  grep -E "max \|diff\| [0-9.e+-]+ >|cases off diffusers" "$log" | head -4 | sed 's/^/      /' || true
  rm -f "$log"
done
