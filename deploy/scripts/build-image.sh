#!/usr/bin/env bash
# Build a serving image with buildah (no Docker engine): `make image`, and the first step of
# deploy/scripts/image-test.sh. Makes the debootstrap base image first when it is missing.
#
#   deploy/scripts/build-image.sh                 # FLAVOUR=cpu -> localhost/transformer-serving:cpu
#   FLAVOUR=gpu deploy/scripts/build-image.sh     # CUDA 13 image
#
# Env: FLAVOUR (cpu|gpu), IMAGE, BASE_IMAGE, CONTEXT (build context, default the repository),
# EXPORT_MODELS (1: export $CONTEXT/models/*/checkpoint in the build stage; 0: no models in
# the image, mount them at /srv/models; default 1 when checkpoints exist, else 0),
# EXPORT_ARGS (extra `python -m export` flags), WHEELS_DIR (local wheels for torch, default
# /opt/wheels when it holds one), PIP_CA (CA bundle for pip behind a TLS proxy, passed as a
# build secret; default the host's bundle).
set -euo pipefail

cd "$(dirname "$0")/../.."
REPO=$PWD
CONTEXT=$(realpath "${CONTEXT:-.}")
FLAVOUR=${FLAVOUR:-cpu}
IMAGE=${IMAGE:-localhost/transformer-serving:$FLAVOUR}
BASE_IMAGE=${BASE_IMAGE:-localhost/transformer-serving-base:bookworm}
PIP_CA=${PIP_CA:-/etc/ssl/certs/ca-certificates.crt}
WHEELS_DIR=${WHEELS_DIR:-/opt/wheels}

command -v buildah >/dev/null || { echo "build-image: buildah is missing (make image-tools)" >&2; exit 2; }
[[ -f $REPO/deploy/Dockerfile.$FLAVOUR ]] || { echo "build-image: FLAVOUR must be cpu or gpu" >&2; exit 2; }

if ! buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "build-image: making the base image $BASE_IMAGE (debootstrap)"
  "$REPO/deploy/scripts/make-base.sh" "$BASE_IMAGE"
fi

if [[ -z ${EXPORT_MODELS:-} ]]; then
  if compgen -G "$CONTEXT/models/*/checkpoint" >/dev/null; then
    EXPORT_MODELS=1
  else
    EXPORT_MODELS=0
    echo "build-image: no models/*/checkpoint: building without models (mount them at /srv/models)"
  fi
fi

build=(--layers -f "$REPO/deploy/Dockerfile.$FLAVOUR" --ignorefile "$REPO/deploy/image.dockerignore"
       --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "EXPORT_MODELS=$EXPORT_MODELS" -t "$IMAGE")
if [[ -s $PIP_CA ]]; then build+=(--secret "id=pip-ca,src=$PIP_CA"); fi
if compgen -G "$WHEELS_DIR/torch-*.whl" >/dev/null; then
  # Local torch wheel (CPU build): no need for the PyTorch index.
  build+=(--build-context "wheels=$WHEELS_DIR" --build-arg TORCH_INDEX_URL=)
fi
if [[ -n ${EXPORT_ARGS:-} ]]; then build+=(--build-arg "EXPORT_ARGS=$EXPORT_ARGS"); fi

echo "build-image: buildah bud ${build[*]} $CONTEXT"
start=$SECONDS
buildah bud "${build[@]}" "$CONTEXT"
echo "build-image: built $IMAGE (EXPORT_MODELS=$EXPORT_MODELS) in $((SECONDS - start)) s"
