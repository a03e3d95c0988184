#!/usr/bin/env bash
# Stage, on this machine, what the lent GPU machine lacks for `loadtest/device/run.sh`:
# onnxruntime-gpu (repacked by ../shared/gpu/stage-ort-gpu) and wheels of the service's
# dependencies that its image does not hold (pydantic, pydantic-settings, the grpcio we
# generated code for and its health, reflection and status packages, protobuf).
#
# A device call carries the working tree plus what it names, 64 MiB in all, and this
# repository's tracked files (the checkpoints) take ~27 MiB of that: the shared script's
# four ~49 MiB parts do not fit. So the archive is re-split here into parts that fit
# beside the tree, written to .gpustage/ (ignored by .gitignore) with the
# list of device calls to make, in order, in .gpustage/CALLS.
#
# Usage (repository root): loadtest/device/stage.sh   (or: make gpu-stage)
set -euo pipefail
root="$(git rev-parse --show-toplevel)"
cd "$root"
ort_version="${ORT_GPU_VERSION:-1.31.1}"
stage=.gpustage
limit=$((64 * 1024 * 1024))
margin=$((4 * 1024 * 1024))

if [ ! -s .ortgpu/sha256 ]; then
  shared="$root/../shared/gpu/stage-ort-gpu"
  [ -x "$shared" ] || { echo "error: $shared not found (see ../shared/gpu/README.md)" >&2; exit 2; }
  "$shared" "$ort_version"
fi

rm -rf "$stage" && mkdir -p "$stage/wheels"
# What travels with every call: tracked files and untracked files git does not ignore.
tree_bytes=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } \
  | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
part_bytes=$((limit - margin - tree_bytes))
if [ "$part_bytes" -lt $((8 * 1024 * 1024)) ]; then
  echo "error: the working tree takes $tree_bytes bytes of a call's $limit: no room to carry parts" >&2
  exit 2
fi
cat .ortgpu/part-* > "$stage/ort.tar.xz"
(cd .ortgpu && echo "$(cat sha256)  ../$stage/ort.tar.xz" | sha256sum -c --quiet -)
cp .ortgpu/sha256 "$stage/ort.sha256"
(cd "$stage" && split -b "$part_bytes" -d -a 2 ort.tar.xz ort-part- && rm ort.tar.xz)

# Python 3.12 wheels for the device image (its python3); versions as pyproject.toml pins
# them, and the pydantic stack as this environment resolved it.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$stage/wheels" \
  grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
  grpcio-status==1.85.1 googleapis-common-protos==1.76.0 protobuf==7.36.2 \
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0 python-dotenv==1.2.4 packaging==26.4

parts=("$stage"/ort-part-*)
{
  echo "# Device calls, in order, each within the machine's warm time (30 s) of the last."
  first=1
  for part in "${parts[@]}"; do
    if [ "$first" = 1 ]; then op=">"; first=0; else op=">>"; fi
    echo "carry [\"$part\"]  command: cat $part $op /root/ort.tar.xz"
  done
  echo "# Before the last: read status's budget_left_s (B). The run plans to end by RUN_BUDGET_S;"
  echo "# past the device time left the tool cuts it, and the served benchmark writes at its end."
  echo "carry [\"$stage/wheels\", \"$stage/ort.sha256\"]  command: RUN_BUDGET_S=<min(570, B - 40)> bash loadtest/device/run.sh  (timeout_s 590)"
} > "$stage/CALLS"
du -sh "$stage"/* | sed "s|$root/||"
echo "tree $((tree_bytes / 1048576)) MiB + part $((part_bytes / 1048576)) MiB per call; calls in $stage/CALLS:"
cat "$stage/CALLS"
