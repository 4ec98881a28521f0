# The gateway's container image: two stages on one Debian base, the project's wheel installed
# with pip into a virtualenv, run as a non-root user under tini.
#
# Without a container registry (Debian and PyPI reachable), make the base first:
#     deploy/docker/build-base.sh                      # -> local/debian:bookworm (debootstrap)
#     docker build -t dbn-gateway:0.1.0 .
# With a registry:
#     docker build --build-arg BASE=python:3.11-slim -t dbn-gateway:0.1.0 .
# (or `make image`; see deploy/README.md). The legacy builder and BuildKit both build it.
#
# Both stages use BASE, so the virtualenv's interpreter path (/usr/bin/python3 on Debian's
# python3, /usr/local/bin/python3 on python:3.11-slim) is the same in the build and the runtime.
ARG BASE=local/debian:bookworm

FROM ${BASE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# Extra CA certificates (deploy/docker/certs/*.crt, put there by build-image.sh --ca-dir): for
# pip behind an egress proxy that re-signs TLS. This stage only; the runtime image has none.
COPY deploy/docker/certs/ /usr/local/share/ca-certificates/extra/
# Debian's python3 (3.11 on bookworm, with ca-certificates), its venv module and headers,
# unless the base has a Python already (python:3.11-slim); gcc for the native order-book
# engine (gateway/books/_native, compiled by cffi when the wheel is built). This stage only.
RUN set -eu; \
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then \
        apt-get update -q; \
        apt-get install -y -q --no-install-recommends python3 python3-venv python3-dev ca-certificates; \
    fi; \
    if ! command -v gcc >/dev/null 2>&1; then \
        apt-get update -q; \
        apt-get install -y -q --no-install-recommends gcc libc6-dev; \
    fi; \
    rm -rf /var/lib/apt/lists/*; \
    update-ca-certificates >/dev/null 2>&1 || true; \
    python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'
WORKDIR /src
COPY setup.py pyproject.toml README.md ./
COPY gateway ./gateway
# the project's wheel (and its dependencies' wheels) first, then an install from those only
RUN set -eu; \
    export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; \
    python3 -m venv /opt/gateway; \
    /opt/gateway/bin/pip install -q --no-cache-dir --disable-pip-version-check --upgrade pip; \
    /opt/gateway/bin/pip wheel -q --no-cache-dir --disable-pip-version-check --wheel-dir /wheels .; \
    /opt/gateway/bin/pip install -q --no-cache-dir --disable-pip-version-check --no-index \
        --find-links /wheels dbn-gateway; \
    /opt/gateway/bin/pip uninstall -q -y pip setuptools; \
    site=$(/opt/gateway/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
    rm -rf "$site"/numpy/*/tests "$site"/numpy/tests "$site"/numpy/_pyinstaller "$site"/numpy/f2py; \
    find /opt/gateway -type f -name '*.pyi' -delete; \
    /opt/gateway/bin/gateway --version; \
    cd / && /opt/gateway/bin/python -c 'import gateway.books.native'

FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
# tini: PID 1 that forwards SIGTERM to the gateway (a Python PID 1 would ignore it until the
# stop grace period ran out) and reaps children
RUN set -eu; \
    pkgs=tini; \
    if ! command -v python3 >/dev/null 2>&1; then pkgs="$pkgs python3"; fi; \
    apt-get update -q; \
    apt-get install -y -q --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log; \
    groupadd --system --gid 10001 gateway; \
    useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/gateway --shell /usr/sbin/nologin gateway; \
    install -d -o gateway -g gateway -m 0750 /var/lib/gateway /var/lib/gateway/journal; \
    install -d -m 0755 /etc/gateway
COPY --from=build /opt/gateway /opt/gateway
COPY deploy/docker/gateway.toml /etc/gateway/gateway.toml
COPY deploy/docker/healthcheck.py /usr/local/lib/gateway-healthcheck.py
ENV PATH=/opt/gateway/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    XDG_STATE_HOME=/var/lib/gateway \
    HEALTHCHECK_URL=http://127.0.0.1:9313/healthz
USER gateway:gateway
WORKDIR /var/lib/gateway
# the journal (and the relay's upstream cursor next to it): keep it on a volume
VOLUME ["/var/lib/gateway"]
# client port, metrics/health port, an ingest port (as in deploy/swarm/primary.toml)
EXPOSE 13000 9313 14000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/gateway/bin/python", "-I", "/usr/local/lib/gateway-healthcheck.py"]
ENTRYPOINT ["/usr/bin/tini", "--", "gateway", "serve", "--config", "/etc/gateway/gateway.toml"]
# keys come from a Docker secret (a file), never from the environment or the command line
CMD ["--api-key-file", "/run/secrets/gateway_api_keys"]
