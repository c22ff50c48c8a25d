#!/usr/bin/env bash
# Build the payload the GPU benchmark needs on a bare GPU box that has torch and transformers but no
# polars and no network: polars wheels (Python 3.12, x86-64), the SmolLM2 tokenizer and model config
# (no weights: the benchmark uses randomly initialised models of the real shapes) and a prebuilt ml-100k
# run directory (data + IG index). Run it here, once, from the repository root:
#
#     bash bench/gpu/prepare.sh            # writes .gpu-payload/ (git-ignored, ~10 MiB)
#
# then on the GPU machine, with .gpu-payload carried along: bash bench/gpu/run.sh "$OUT"
set -euo pipefail
cd "$(dirname "$0")/../.."
PAYLOAD=${PAYLOAD:-.gpu-payload}
PY=${PY:-.venv/bin/python}
POLARS_VERSION=$($PY -c "import polars; print(polars.__version__)")

mkdir -p "$PAYLOAD/wheels"
grep -qx "/$PAYLOAD/" .git/info/exclude 2>/dev/null || echo "/$PAYLOAD/" >> "$(git rev-parse --git-common-dir)/info/exclude"
for wheel in "polars==$POLARS_VERSION" "polars-runtime-32==$POLARS_VERSION"; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$PAYLOAD/wheels" "$wheel" || echo "note: $wheel has no wheel of that name (older polars ships as one wheel)"
done

# Tokenizer + model config of the embedded model (the 135M shape); the 1.4B shape is derived in the script.
$PY - "$PAYLOAD" <<'EOF'
import shutil, sys
from pathlib import Path
from igdrec.modeling import load_tokenizer, resolve_model_path
payload = Path(sys.argv[1])
source = Path(resolve_model_path("smollm2-135m"))
target = payload / "smollm2-135m"
target.mkdir(parents=True, exist_ok=True)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    if (source / name).exists():
        shutil.copy(source / name, target / name)
load_tokenizer(str(source))  # fails here, not on the GPU box, if the tokenizer cannot load
EOF

# The ml-100k run directory: preprocess + IG index with the embedded tokenizer.
RUN="$PAYLOAD/run"
$PY -m igdrec.cli preprocess --run-dir "$RUN" >/dev/null
$PY -m igdrec.cli build-ig-index --run-dir "$RUN" >/dev/null
rm -rf "$RUN/.partial"
du -sh "$PAYLOAD"
