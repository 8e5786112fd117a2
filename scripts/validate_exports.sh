#!/usr/bin/env bash
# Validates gen-scene's exports with external tools (not needed by CI, whose Rust tests check
# the structure themselves):
#   - Khronos glTF validator (npm `gltf-validator`, pinned in scripts/validator/package.json,
#     installed into scripts/validator/node_modules) on the .glb files;
#   - Python `plyfile` (pinned below, installed into /work/venv) + numpy + Pillow on the .ply,
#     .glb, .obj, .gif and .png files (scripts/validate_exports.py).
# The files come from `cargo run -p gen-scene --example export_sample` into a temporary folder.
#
# Usage: scripts/validate_exports.sh [OUT_DIR]     (env PYTHON overrides /work/venv/bin/python)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-/work/venv/bin/python}"
OUT="${1:-$(mktemp -d -t gen-exports-XXXXXX)}"
PLYFILE_VERSION="1.1.2"

echo "== installing validators"
(cd "$ROOT/scripts/validator" && npm ci --no-audit --no-fund --silent)
"$PY" -m pip install --quiet "plyfile==$PLYFILE_VERSION"

echo "== writing sample exports to $OUT"
(cd "$ROOT" && cargo run --quiet -p gen-scene --example export_sample -- "$OUT")

echo "== glTF validator"
status=0
node "$ROOT/scripts/validator/validate_gltf.mjs" "$OUT"/*.glb || status=1

echo "== plyfile / numpy / Pillow checks"
"$PY" "$ROOT/scripts/validate_exports.py" "$OUT" || status=1

echo "== importer on a file written by plyfile (shuffled order, doubles, extra properties)"
"$PY" "$ROOT/scripts/validate_exports.py" --write-foreign "$OUT/foreign.ply" "$OUT/foreign.json"
(cd "$ROOT" && cargo run --quiet -p gen-scene --example export_sample -- --import "$OUT/foreign.ply") \
  > "$OUT/foreign_import.json" || status=1
"$PY" "$ROOT/scripts/validate_exports.py" --compare-import "$OUT/foreign.json" "$OUT/foreign_import.json" || status=1

if [ "$status" -eq 0 ]; then echo "== all export checks passed ($OUT)"; else echo "== export checks FAILED ($OUT)"; fi
exit "$status"
