#!/usr/bin/env bash
# Download the Python wheels that bench/gpu_check.sh needs on the lent GPU machine into .whl/.
#
# The device machine (see the device tool's KINDS.md) has Python 3.12 with a CUDA PyTorch,
# transformers, huggingface-hub, safetensors, torchmetrics, numpy, scipy, pillow, pyyaml, rich,
# typer, markdown, narwhals, tqdm, pytest, pytest-xdist and pytest-timeout, and no network. What
# this project imports on the paths gpu_check.sh runs and that image lacks travels as wheels:
# the trainers' diffusers and pydantic, the study runner's optuna (+ sqlalchemy, alembic, mako,
# colorlog) and duckdb, plotly for the study's HTML report, and typing-extensions (pydantic-core
# needs >= 4.16, newer than the image may have). Versions are read from uv.lock, so the device
# runs what the project pins. torch is never carried (the device's CUDA build is used).
#
#   bash bench/gpu_wheels.sh          # -> .whl/*.whl (about 47 MiB); .whl/ is git-ignored
#
# Then run bench/gpu_check.sh on the device with `carry: [".whl"]` (see its header).
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYVER=${GPU_WHEELS_PYTHON:-3.12}
PACKAGES=(
    diffusers
    pydantic pydantic-core annotated-types typing-inspection typing-extensions
    optuna sqlalchemy alembic mako colorlog
    duckdb
    plotly
)

# name==version for each package, from uv.lock (one version per package: two stop the install).
mapfile -t PINS < <(python3 - "${PACKAGES[@]}" <<'EOF'
import sys
import tomllib

with open("uv.lock", "rb") as f:
    lock = tomllib.load(f)
versions: dict[str, set[str]] = {}
for pkg in lock["package"]:
    versions.setdefault(pkg["name"], set()).add(pkg["version"])
for name in sys.argv[1:]:
    found = sorted(versions.get(name, ()))
    if len(found) != 1:
        sys.exit(f"uv.lock has {len(found)} versions of {name}: {found}")
    print(f"{name}=={found[0]}")
EOF
)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp "${platforms[@]}" -d "$DEST" "${PINS[@]}"

count=$(find "$DEST" -maxdepth 1 -type f -name '*.whl' | wc -l)
if [ "$count" -ne "${#PINS[@]}" ]; then
    echo "expected ${#PINS[@]} wheels in $DEST, found $count" >&2
    exit 1
fi
ls -1 "$DEST"
echo "$count wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
