#!/usr/bin/env bash
# Writes golden/<case>/reference-bf16.safetensors for every committed case: transformers'
# forward of the case's own tokens with bf16 products (every F.linear's input and weight, and the
# attention's q, k, probabilities and v, rounded to bf16, f32 accumulation; see
# golden/reference.py --products bf16), the reference glimpse's
# `--precision bf16` is verified against.
#
#   golden/bf16-references.sh [PYTHON=venv/bin/python]
set -euo pipefail
python=${1:-venv/bin/python}
cd "$(dirname "$0")/.."
for case in bf16-fused flat fp8-sharded grouped-shared-yarn mtp; do
  # golden/mtp's reference checks its MTP head: so does its bf16 one.
  mtp=()
  [ "$case" = mtp ] && mtp=(--mtp)
  "$python" golden/reference.py --model "golden/$case" --tokens-from "golden/$case/reference.safetensors" \
    --products bf16 "${mtp[@]}" --out "golden/$case/reference-bf16.safetensors"
done
