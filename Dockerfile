# syntax=docker/dockerfile:1
# tiktok-conversions-worker image:  make image  (docker, podman or buildah; see the README)
#
# Stage 1 builds the worker's wheel and collects every dependency as a wheel (binary only:
# all of them publish manylinux wheels, so no compiler is needed anywhere).
# Stage 2 installs those wheels offline into /opt/venv, drops pip, and runs as uid/gid 10001.
# Nothing is written at run time outside /tmp, so the root filesystem can be read-only
# (the Helm chart mounts an emptyDir at /tmp and sets readOnlyRootFilesystem).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip wheel --only-binary=:all: --wheel-dir /wheels /wheels/tiktok_conversions_worker-*.whl

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1
RUN groupadd --system --gid 10001 worker \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin worker
# The wheels are bind-mounted, not copied, so they never become a layer of the final image.
# pip compiles the bytecode at install time; the base image's pip is removed afterwards.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/venv \
 && python -m pip --python /opt/venv/bin/python install --no-index --find-links=/wheels \
      --no-cache-dir --disable-pip-version-check tiktok-conversions-worker \
 && python -m pip uninstall --yes --quiet pip setuptools wheel \
 && tiktok-worker --version
USER 10001:10001
WORKDIR /tmp
EXPOSE 9464
ENTRYPOINT ["tiktok-worker"]
CMD ["run", "--config", "/etc/tiktok-worker/config.yaml"]
