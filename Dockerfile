# syntax=docker/dockerfile:1
# tiktok-conversions-worker image:  make image  (docker, podman or buildah; see the README)
#
# The interpreter is Debian bookworm's python3.11 package on debian:bookworm-slim: the same
# build `make setup` puts in .venv, so `make bench` measures what the image runs (issue 18;
# Debian builds it with PGO and LTO, libpython linked into the executable; docs/benchmarks.md,
# "Interpreter build").
# Stage `python` is that base: python3.11 plus CA certificates, time zones and netbase.
# Stage `build` builds the worker's wheel and downloads every dependency as a wheel, at exactly
# the versions and hashes of requirements.lock (`make lock` refreshes it; binary only: all of
# them publish manylinux wheels, so no compiler is needed anywhere), with the pip of Debian's
# python3.11-venv.
# Stage `runtime` installs those wheels offline into /opt/venv, hash-checked again, with pip run
# from Debian's pip wheel (bind-mounted, so /opt/venv never gets a pip), and runs as uid/gid
# 10001. Nothing is written at run time outside /tmp, so the root filesystem can be read-only
# (the Helm chart mounts an emptyDir at /tmp and sets readOnlyRootFilesystem); Debian
# byte-compiles the standard library when the package is installed.
ARG DEBIAN_IMAGE=debian:bookworm-slim
# requirements.lock, or requirements-aws.lock for kafka.security.mechanism: aws (AWS MSK IAM):
#   docker build --build-arg LOCK=requirements-aws.lock ...
ARG LOCK=requirements.lock

FROM ${DEBIAN_IMAGE} AS python
ENV LANG=C.UTF-8
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3.11 ca-certificates netbase tzdata \
 && rm -rf /var/lib/apt/lists/*

FROM python AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /tools \
 && mkdir /pip \
 && cp /usr/share/python-wheels/pip-*.whl /pip/pip.whl
ENV PATH=/tools/bin:${PATH}
WORKDIR /src
ARG LOCK
COPY pyproject.toml README.md requirements.lock requirements-aws.lock ./
COPY worker ./worker
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip wheel --require-hashes --only-binary=:all: --wheel-dir /wheels -r ${LOCK} \
 && cp ${LOCK} /wheels/requirements.lock

FROM python AS runtime
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1
RUN groupadd --system --gid 10001 worker \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin worker
# The wheels and pip are bind-mounted, not copied, so they never become a layer of the final
# image. pip compiles the bytecode at install time. The last check: no pip importable from the
# venv (-I: not from the working directory, / here, which holds the /pip mount).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=bind,from=build,source=/pip,target=/pip \
    python3.11 -m venv --without-pip /opt/venv \
 && /opt/venv/bin/python /pip/pip.whl/pip install --no-index --find-links=/wheels \
      --no-cache-dir --disable-pip-version-check --require-hashes -r /wheels/requirements.lock \
 && /opt/venv/bin/python /pip/pip.whl/pip install --no-index --no-deps \
      --no-cache-dir --disable-pip-version-check /wheels/tiktok_conversions_worker-*.whl \
 && /opt/venv/bin/python /pip/pip.whl/pip check --disable-pip-version-check \
 && ! /opt/venv/bin/python -I -c 'import pip' 2>/dev/null \
 && tiktok-worker --version
USER 10001:10001
WORKDIR /tmp
EXPOSE 9464
ENTRYPOINT ["tiktok-worker"]
CMD ["run", "--config", "/etc/tiktok-worker/config.yaml"]
