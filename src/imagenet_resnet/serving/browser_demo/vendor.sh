#!/usr/bin/env bash
# Refreshes vendor/onnxruntime-web/ from the version package-lock.json pins (npm checks the tarball's integrity):
# the WebAssembly build's ES module with its glue inlined, its .wasm, and the licence. The npm package ships no
# LICENSE file; its package.json says MIT, and LICENSE is the onnxruntime repository's own. To move to another
# version: change package.json, run `npm install --package-lock-only --ignore-scripts`, then this script, then
# the browser tests (tests/test_static_space.py).
set -euo pipefail
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp package.json package-lock.json "$work"
(cd "$work" && npm ci --ignore-scripts --no-audit --no-fund >/dev/null)
dist="$work/node_modules/onnxruntime-web/dist"
target=vendor/onnxruntime-web
mkdir -p "$target"
cp "$dist/ort.wasm.bundle.min.mjs" "$dist/ort-wasm-simd-threaded.wasm" "$target/"
(cd "$target" && sha256sum ort.wasm.bundle.min.mjs ort-wasm-simd-threaded.wasm > SHA256SUMS)
node -e 'const p=require(process.argv[1]);console.log(p.name+" "+p.version+" ("+p.license+")")' \
    "$work/node_modules/onnxruntime-web/package.json" > "$target/VERSION"
