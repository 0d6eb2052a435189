# The nbdgw gateway: a small, non-root image that runs with a read-only root filesystem.
#
#   podman build --format docker -t nbdgw .                       # python:3.11-slim base
#   podman build --format docker --pull=never \
#       --build-arg BASE=localhost/debian:bookworm -t nbdgw .      # a locally made Debian base
#
# Writable at run time: /tmp (emptyDir or tmpfs) and the data dir /var/lib/nbdgw, where
# `nbdgw serve` with no configuration creates its sample disk and NBD socket.
# scripts/container-check builds, lints and smoke-tests this file (docs/deployment.md).
ARG BASE=python:3.11-slim

# --- build: a virtualenv at a fixed path holding nbdgw and its dependencies -------------------
FROM ${BASE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian's bare image has no python3; python:*-slim has one in /usr/local. Keep the same Python
# in both stages: the venv's interpreter is a symlink to the base's python3.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/nbdgw
ENV PATH=/opt/nbdgw/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# Dependencies first (their layer survives source edits), then the project itself.
COPY pyproject.toml README.md ./
# The installed CA bundle (with any proxy CA the base image trusts) rather than certifi's.
RUN if [ -f /etc/ssl/certs/ca-certificates.crt ]; then \
        export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; \
    fi \
    && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' \
        > /tmp/build-requirements.txt \
    && pip install --no-compile -r /tmp/requirements.txt \
    && pip install --no-compile --target /opt/build-tools -r /tmp/build-requirements.txt
COPY nbdcore ./nbdcore
COPY gateway ./gateway
COPY nbdgw ./nbdgw
# No build isolation: the build tools wait outside the venv (so none of them, nor their
# dependencies, reach the runtime), and an isolated build would fetch them again without the
# CA bundle. Then drop pip and the setuptools that ensurepip put in the venv, and compile once:
# the read-only root filesystem could not hold .pyc files later.
RUN PYTHONPATH=/opt/build-tools pip install --no-compile --no-deps --no-build-isolation . \
    && pip uninstall -q -y setuptools pip \
    && python3 -m compileall -q -j 0 /opt/nbdgw/lib

# --- runtime ---------------------------------------------------------------------------------
FROM ${BASE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    fi \
    && groupadd --gid 65532 nbdgw \
    && useradd --uid 65532 --gid 65532 --key UID_MAX=65534 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin nbdgw \
    && install -d -o 65532 -g 65532 -m 0700 /var/lib/nbdgw
COPY --from=build /opt/nbdgw /opt/nbdgw
ENV PATH=/opt/nbdgw/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 65532:65532
WORKDIR /var/lib/nbdgw
VOLUME ["/var/lib/nbdgw"]
# 50051: the gRPC API (and grpc.health.v1).
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; ch = grpc.insecure_channel('127.0.0.1:50051'); r = g.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=2); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]
# Exec form: Python is PID 1 and gets SIGTERM itself (the gateway drains and exits 0).
ENTRYPOINT ["/opt/nbdgw/bin/nbdgw"]
CMD ["serve", "--listen", "0.0.0.0:50051", "--data-dir", "/var/lib/nbdgw"]
