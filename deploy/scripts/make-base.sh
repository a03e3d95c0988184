#!/usr/bin/env bash
# Build a minimal Debian base image with debootstrap and commit it with buildah, so that the
# serving images build without a registry or a Docker engine (deploy/Dockerfile.* take it as
# ARG BASE_IMAGE). Needs root (debootstrap) and buildah.
#
#   deploy/scripts/make-base.sh [IMAGE]          default IMAGE=localhost/transformer-serving-base:bookworm
#
# Env: SUITE (bookworm), MIRROR (http://deb.debian.org/debian), FORCE=1 rebuilds an existing image.
# The base carries python3 + venv + CA certificates (python 3.11 on bookworm, what the
# project's requires-python allows) and nothing else; apt lists are removed.
set -euo pipefail

IMAGE=${1:-${BASE_IMAGE:-localhost/transformer-serving-base:bookworm}}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PACKAGES=${PACKAGES:-python3,python3-venv,ca-certificates}

for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || { echo "make-base: $tool is missing (make image-tools)" >&2; exit 2; }
done
if [[ $(id -u) -ne 0 ]]; then
  echo "make-base: debootstrap needs root" >&2; exit 2
fi
if [[ -z ${FORCE:-} ]] && buildah inspect --type image "$IMAGE" >/dev/null 2>&1; then
  echo "make-base: $IMAGE exists (FORCE=1 to rebuild)"; exit 0
fi

work=$(mktemp -d /var/tmp/make-base.XXXXXX)
ctr=
cleanup() {
  [[ -n $ctr ]] && buildah rm "$ctr" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

rootfs=$work/rootfs
echo "make-base: debootstrap $SUITE from $MIRROR into $rootfs"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR"

# Keep apt usable (Dockerfiles may apt-get install more) but drop caches and docs.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* \
  "$rootfs"/var/log/*.log "$rootfs"/tmp/* "$rootfs"/var/tmp/*
: > "$rootfs"/etc/machine-id
# Same resolver inside builds as on the host that runs them (buildah bind-mounts its own).
rm -f "$rootfs"/etc/resolv.conf

tar --numeric-owner --xattrs -C "$rootfs" -cf "$work/rootfs.tar" .
ctr=$(buildah from scratch)
buildah add "$ctr" "$work/rootfs.tar" /
buildah config \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 \
  --cmd /bin/bash \
  --label org.opencontainers.image.title="debian-$SUITE-minbase-python3" \
  --label org.opencontainers.image.description="debootstrap --variant=minbase $SUITE + $PACKAGES" \
  "$ctr"
buildah commit --rm "$ctr" "$IMAGE"
ctr=
echo "make-base: committed $IMAGE"
