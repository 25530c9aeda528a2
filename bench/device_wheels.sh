#!/usr/bin/env bash
# The wheel folders bench/h200_next.sh's device calls carry (the device reaches no index; its image
# has torch 2.11+cu130 and Python 3.12 but not these). Run here, from the repo root, once per machine:
#   bash bench/device_wheels.sh        # -> .whl/c (60 MiB), .whl/e (25 MiB), .whl/f (28 MiB)
# .whl/c: transformers, pydantic, sqlite-utils, openai-harmony, bitsandbytes (GPU tests, benches)
# .whl/e: .whl/c without bitsandbytes, plus deepspeed, hjson, quicktok-v1 (the launcher, bf16/MXFP4)
# .whl/f: .whl/e plus bitsandbytes with only its CUDA 13 and CPU libraries (the launcher with NF4;
#         the whole bitsandbytes wheel, 43 MB, would take the carry past its 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
get() {  # get DIR PKG==VER...: manylinux wheels for the device's CPython 3.12
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_24_x86_64 -d "$dir" "$@" 2>&1 | grep -v -i warning || true
}
mkdir -p .whl/c .whl/e .whl/f
get .whl/c transformers==5.24.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types typing_inspection \
  sqlite_utils==4.2.1 sqlite_fts4 click_default_group openai_harmony==0.0.8 bitsandbytes==0.50.2
cp .whl/c/*.whl .whl/e/ && rm .whl/e/bitsandbytes-*.whl
get .whl/e hjson quicktok_v1==0.4.0
ls .whl/e/deepspeed-0.19.8-*.whl >/dev/null 2>&1 || .venv/bin/pip wheel -q --no-deps deepspeed==0.19.8 -w .whl/e
cp .whl/e/*.whl .whl/f/
python3 - <<'EOF'
import glob, zipfile
src = glob.glob(".whl/c/bitsandbytes-*.whl")[0]
dst = src.replace(".whl/c/", ".whl/f/")
drop = lambda n: n.startswith("bitsandbytes/libbitsandbytes_") and not ("cuda130" in n or "_cpu" in n)
with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as out:
    for info in z.infolist():
        if drop(info.filename):
            continue
        data = z.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):  # list only what the wheel holds
            data = b"\n".join(l for l in data.split(b"\n") if not drop(l.decode().split(",")[0]))
        out.writestr(info, data)
EOF
du -sh .whl/c .whl/e .whl/f
