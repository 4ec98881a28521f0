#!/bin/sh
# build-image.sh: build the gateway's container image from this checkout.
#
#   deploy/docker/build-image.sh [-t TAG] [--base IMAGE] [--ca-dir DIR] [--network MODE]
#
#   -t TAG          image tag (default dbn-gateway:latest)
#   --base IMAGE    base of both stages (default local/debian:bookworm, made with
#                   build-base.sh when the daemon does not have it; with a registry:
#                   python:3.11-slim)
#   --ca-dir DIR    trust DIR/*.crt in the build stage (pip behind a TLS-re-signing proxy)
#   --network MODE  network of the build's RUN steps (default host: works on a daemon started
#                   without a bridge or IP forwarding, such as the private one of make test-swarm)
#
# The build context is a temporary copy of what the image needs (Dockerfile, .dockerignore,
# pyproject.toml, setup.py, README.md, gateway/ without build outputs, deploy/docker/, plus the
# extra CA certificates), so the working tree is never written to. Talks to the daemon named by
# DOCKER_HOST. Uses BuildKit when the docker CLI has buildx, else the legacy builder.
set -eu

TAG=dbn-gateway:latest
BASE=local/debian:bookworm
CA_DIR=
NETWORK=host
while [ $# -gt 0 ]; do
  case $1 in
    -t) TAG=$2; shift 2 ;;
    --base) BASE=$2; shift 2 ;;
    --ca-dir) CA_DIR=$2; shift 2 ;;
    --network) NETWORK=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "build-image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  case $BASE in
    local/*)
      echo "build-image.sh: no $BASE on this daemon: making it with build-base.sh"
      "$HERE/build-base.sh" "$BASE"
      ;;
    *) : ;;  # a registry image: docker build pulls it
  esac
fi

CTX=$(mktemp -d "${TMPDIR:-/tmp}/build-image.XXXXXX")
cleanup() { rm -rf "$CTX"; }
trap cleanup EXIT
trap 'exit 130' HUP INT PIPE TERM

cp "$ROOT/Dockerfile" "$ROOT/.dockerignore" "$ROOT/pyproject.toml" "$ROOT/setup.py" \
  "$ROOT/README.md" "$CTX/"
mkdir -p "$CTX/deploy"
cp -R "$ROOT/gateway" "$CTX/gateway"
cp -R "$ROOT/deploy/docker" "$CTX/deploy/docker"
find "$CTX" -name __pycache__ -type d -prune -exec rm -rf {} +
# the native book engine is compiled in the image, never copied from this machine
rm -f "$CTX"/gateway/books/_native/*.so "$CTX"/gateway/books/_native/*.o \
  "$CTX"/gateway/books/_native/_books.c
rm -f "$CTX"/deploy/docker/certs/*.crt
if [ -n "$CA_DIR" ]; then
  found=0
  for crt in "$CA_DIR"/*.crt; do
    [ -f "$crt" ] || continue
    cp "$crt" "$CTX/deploy/docker/certs/"
    found=$((found + 1))
  done
  echo "build-image.sh: $found extra CA certificate(s) from $CA_DIR for the build stage"
fi

if ! docker buildx version >/dev/null 2>&1; then
  DOCKER_BUILDKIT=0
  export DOCKER_BUILDKIT
fi
echo "build-image.sh: docker build --build-arg BASE=$BASE -t $TAG"
docker build --network "$NETWORK" --build-arg "BASE=$BASE" -t "$TAG" "$CTX"
docker image inspect --format "build-image.sh: $TAG {{.Id}} {{.Size}} bytes" "$TAG"
