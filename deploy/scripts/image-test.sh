#!/usr/bin/env bash
# Build the serving image with buildah (no Docker engine), run it with podman the way a
# locked-down cluster would (non-root, read-only root filesystem, no network, no
# capabilities), and check it: gRPC health SERVING, one Translate call, /metrics, then
# SIGTERM -> drain -> exit code 0. This is `make image-test`.
#
#   deploy/scripts/image-test.sh            # FLAVOUR=cpu
#   FLAVOUR=gpu deploy/scripts/image-test.sh  # builds the CUDA image; runs it only with GPU=1
#
# Models: when models/<name>/checkpoint/ exist, the image exports them in its build stage
# (EXPORT_MODELS=1). Otherwise (or with MODELS_DIR=path) the image is built without models and
# a model repository is mounted read-only at /srv/models: MODELS_DIR, or else the tiny random
# test models of tests/conftest.py (built with the project venv; checks the container, not the
# model quality).
#
# Env: those of deploy/scripts/build-image.sh (FLAVOUR, IMAGE, BASE_IMAGE, CONTEXT, EXPORT_ARGS,
# WHEELS_DIR, PIP_CA), MODELS_DIR, SKIP_BUILD=1, KEEP=1 (keep the container),
# HEALTH_TIMEOUT_S (300), PYTHON (.venv/bin/python), GPU=1 (run the gpu image with the
# NVIDIA CDI device nvidia.com/gpu=all).
set -euo pipefail

cd "$(dirname "$0")/../.."
REPO=$PWD
CONTEXT=$(realpath "${CONTEXT:-.}")
FLAVOUR=${FLAVOUR:-cpu}
IMAGE=${IMAGE:-localhost/transformer-serving:$FLAVOUR}
BASE_IMAGE=${BASE_IMAGE:-localhost/transformer-serving-base:bookworm}
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-300}
PYTHON=${PYTHON:-.venv/bin/python}
NAME=transformer-serving-image-test-$$
CHECK=deploy/scripts/container_check.py

log() { printf '\n== image-test: %s\n' "$*"; }
die() { printf 'image-test: FAILED: %s\n' "$*" >&2; exit 1; }

for tool in buildah podman; do
  command -v "$tool" >/dev/null || die "$tool is missing (make image-tools)"
done

work=$(mktemp -d /var/tmp/image-test.XXXXXX)
cleanup() {
  if [[ -z ${KEEP:-} ]]; then podman rm -f "$NAME" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# --- models -------------------------------------------------------------------------------
mount_models=()
if [[ -z ${MODELS_DIR:-} ]] && compgen -G "$CONTEXT/models/*/checkpoint" >/dev/null; then
  export_models=1
  log "$CONTEXT/models/*/checkpoint found: the image exports them"
else
  export_models=0
  if [[ -z ${MODELS_DIR:-} ]]; then
    MODELS_DIR=$work/models
    log "no models/*/checkpoint: building the tiny test models into $MODELS_DIR"
    "$PYTHON" -c "import sys; from pathlib import Path; sys.path.insert(0, '.'); \
from tests.conftest import build_model_repository; build_model_repository(Path(sys.argv[1]))" \
      "$MODELS_DIR"
  fi
  [[ -d $MODELS_DIR ]] || die "MODELS_DIR=$MODELS_DIR is not a directory"
  chmod -R a+rX "$MODELS_DIR"
  mount_models=(--volume "$(realpath "$MODELS_DIR"):/srv/models:ro")
  log "mounting $MODELS_DIR read-only at /srv/models"
fi

# --- build --------------------------------------------------------------------------------
if [[ -z ${SKIP_BUILD:-} ]]; then
  log "build"
  FLAVOUR=$FLAVOUR IMAGE=$IMAGE BASE_IMAGE=$BASE_IMAGE CONTEXT=$CONTEXT EXPORT_MODELS=$export_models \
    "$REPO/deploy/scripts/build-image.sh"
fi

user=$(podman image inspect "$IMAGE" --format '{{.Config.User}}')
[[ ${user%%:*} != 0 && ${user%%:*} != root && -n $user ]] || die "image runs as root ($user)"
podman run --rm --runtime runc --network none --ulimit nofile=1024:1024 --ulimit nproc=1000:1000 \
  --entrypoint python "$IMAGE" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is not None)' \
  || die "the serving image carries torch"

# --- run ----------------------------------------------------------------------------------
run=(--detach --name "$NAME" --runtime runc --network none
     --ulimit nofile=1024:1024 --ulimit nproc=1000:1000
     --read-only --tmpfs /tmp:rw,size=64m,mode=1777
     --cap-drop ALL --security-opt no-new-privileges
     --env SERVE_DRAIN_GRACE_S=10 --env SERVE_MAX_CONNECTIONS=512 "${mount_models[@]}")
if [[ $FLAVOUR == gpu ]]; then
  [[ -n ${GPU:-} ]] || { log "gpu image built; not run (GPU=1 runs it with --device nvidia.com/gpu=all)"; exit 0; }
  run+=(--device nvidia.com/gpu=all)
fi
log "podman run ${run[*]} $IMAGE"
podman run "${run[@]}" "$IMAGE" >/dev/null
logs() { podman logs --tail 40 "$NAME" 2>&1 | sed 's/^/  | /' >&2; }

log "waiting for gRPC health (<= ${HEALTH_TIMEOUT_S}s)"
podman exec -i "$NAME" python - health "$HEALTH_TIMEOUT_S" < "$CHECK" || { logs; die "never SERVING"; }

log "Translate"
podman exec -i "$NAME" python - translate "In the beginning God created the heaven and the earth." \
  < "$CHECK" || { logs; die "Translate failed"; }

log "metrics"
podman exec -i "$NAME" python - metrics inference_requests_total inference_model_ready \
  inference_request_duration_seconds_bucket < "$CHECK" || { logs; die "metrics missing"; }

log "process and filesystem"
[[ $(podman exec "$NAME" id -u) != 0 ]] || die "running as root"
if podman exec "$NAME" sh -c 'touch /srv/models/x 2>/dev/null || touch /opt/x 2>/dev/null'; then
  die "root filesystem or models are writable"
fi
pid1=$(podman exec "$NAME" cat /proc/1/cmdline | tr '\0' ' ')
[[ $pid1 == python\ -m\ service* ]] || die "PID 1 is '$pid1', not the service"
echo "pid 1: $pid1; uid $(podman exec "$NAME" id -u); root filesystem read-only"

log "SIGTERM (podman stop uses the image's STOPSIGNAL) -> drain -> exit 0"
start=$SECONDS
podman stop --time 60 "$NAME" >/dev/null
code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
podman logs "$NAME" 2>&1 | tail -3 | sed 's/^/  | /'
[[ $code == 0 ]] || die "exit code $code after SIGTERM"
echo "exited 0 after $((SECONDS - start)) s"

log "PASSED ($IMAGE)"
