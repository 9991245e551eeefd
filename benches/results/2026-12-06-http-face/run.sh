#!/usr/bin/env bash
# The HTTP face against gRPC and the engine in-process, in one run on one machine (issue 25):
# the tiny SD1 fixture, 64x64, 4 steps, PNG out, release binaries. Two rounds; the faces
# alternate which goes first. Usage (from the repository root, after
# `cargo build --release -p jhakaas-worker -p jhakaas-benches --bin jhakaas-worker --bin jhakaas-load`):
#   bash benches/results/2026-12-06-http-face/run.sh > benches/results/2026-12-06-http-face/run.txt
set -euo pipefail
bin="${CARGO_TARGET_DIR:-target}/release"
model=tests/fixtures/models/sd1-tiny
load=("$bin/jhakaas-load" --steps 4 --side 64)
"$bin/jhakaas-worker" serve --model "tiny=$model" --device cpu --listen 127.0.0.1:50561 \
  --metrics-listen 127.0.0.1:0 --http-listen 127.0.0.1:8091 --max-queue 64 >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -sf 127.0.0.1:8091/readyz >/dev/null 2>&1 && break
  sleep 0.2
done
grpc() { "${load[@]}" --addr 127.0.0.1:50561 "$@"; }
http() { "${load[@]}" --http 127.0.0.1:8091 "$@"; }
for round in 1 2; do
  echo "## round $round"
  "${load[@]}" --engine "$model" --jobs 64
  if [ "$round" = 1 ]; then first=grpc second=http; else first=http second=grpc; fi
  "$first" --clients 1 --jobs 64
  "$second" --clients 1 --jobs 64
  "$first" --clients 8 --jobs 128
  "$second" --clients 8 --jobs 128
done
kill -TERM $server
wait $server || true
