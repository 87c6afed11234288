#!/usr/bin/env bash
# Builds the Docker images the runtime tests and benchmarks use, with no registry:
#   shoal-test/web:1, shoal-test/web:2  busybox httpd on :8080 serving "shoal-test web vN" and /healthz
#   shoal-test/crashy                   exits with code 3 after about 2 s
# All are FROM scratch plus Debian's static busybox, built with the classic builder (pulls
# nothing). Idempotent: re-running rebuilds from the build cache. Needs root for apt-get when
# /bin/busybox is missing.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
contexts="$repo/test-images"

if [ ! -x /bin/busybox ]; then
    echo "build-test-images: /bin/busybox missing, installing busybox-static" >&2
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y busybox-static >&2; then
        apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y busybox-static >&2
    fi
fi
if ! file_type="$(LC_ALL=C od -An -c -N4 /bin/busybox | tr -d ' ')" || [ "$file_type" != '177ELF' ]; then
    echo "build-test-images: /bin/busybox is not an ELF binary" >&2
    exit 1
fi

if ! docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
    echo "build-test-images: the Docker engine is not reachable (is dockerd running?)" >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

build() { # name context [build args...]
    local tag="$1" ctx="$2"
    shift 2
    rm -rf "$work/ctx"
    cp -r "$contexts/$ctx" "$work/ctx"
    cp /bin/busybox "$work/ctx/busybox"
    echo "build-test-images: building $tag" >&2
    DOCKER_BUILDKIT=0 docker build -q --label org.shoal.test=1 "$@" -t "$tag" "$work/ctx" >/dev/null
}

build shoal-test/web:1 web --build-arg VERSION=1
build shoal-test/web:2 web --build-arg VERSION=2
build shoal-test/crashy crashy
docker image ls --filter label=org.shoal.test=1 --format '{{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' >&2
