# syntax=docker/dockerfile:1
# tiktok-conversions-worker image:  make image  (docker, podman or buildah; see the README)
#
# Stage 1 builds the worker's wheel and downloads every dependency as a wheel, at exactly the
# versions and hashes of requirements.lock (`make lock` refreshes it; binary only: all of them
# publish manylinux wheels, so no compiler is needed anywhere).
# Stage 2 installs those wheels offline into /opt/venv, hash-checked again, drops pip, and runs
# as uid/gid 10001.
# Nothing is written at run time outside /tmp, so the root filesystem can be read-only
# (the Helm chart mounts an emptyDir at /tmp and sets readOnlyRootFilesystem).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# requirements.lock, or requirements-aws.lock for kafka.security.mechanism: aws (AWS MSK IAM):
#   docker build --build-arg LOCK=requirements-aws.lock ...
ARG LOCK=requirements.lock

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
ARG LOCK
COPY pyproject.toml README.md requirements.lock requirements-aws.lock ./
COPY worker ./worker
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip wheel --require-hashes --only-binary=:all: --wheel-dir /wheels -r ${LOCK} \
 && cp ${LOCK} /wheels/requirements.lock

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
      --no-cache-dir --disable-pip-version-check --require-hashes -r /wheels/requirements.lock \
 && python -m pip --python /opt/venv/bin/python install --no-index --no-deps \
      --no-cache-dir --disable-pip-version-check /wheels/tiktok_conversions_worker-*.whl \
 && python -m pip --python /opt/venv/bin/python check --disable-pip-version-check \
 && python -m pip uninstall --yes --quiet pip setuptools wheel \
 && tiktok-worker --version
USER 10001:10001
WORKDIR /tmp
EXPOSE 9464
ENTRYPOINT ["tiktok-worker"]
CMD ["run", "--config", "/etc/tiktok-worker/config.yaml"]
