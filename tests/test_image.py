"""The container image: the Dockerfile's install steps, replayed without a Docker engine.

The Dockerfile (1) builds the worker's wheel with `pip wheel --no-deps .`, (2) collects the
dependencies as binary wheels, (3) installs them with `--no-index` into a fresh virtualenv that
has no pip of its own. These tests run the same steps into a temporary directory and run the
installed `tiktok-worker` from there, far from the source tree, so a module or dependency missing
from the package metadata fails here rather than in a cluster. The dependency wheels are
collected once per pyproject.toml into the cache (the only network use); later runs are offline.
The Dockerfile's own shape (stages, interpreter, user, entrypoint) is checked statically.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests import tools
from tests.chart_support import ROOT, cache_root, render
from worker import __version__

BUILD_REQUIRES = tuple(
    tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
)
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"


def _pip(*args: str, timeout: float = 300) -> None:
    tools.require("the wheel build")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


def _build_context(dest: Path) -> Path:
    """The Docker build context: the files .dockerignore lets through (what COPY can see)."""
    dest.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", dest)
    shutil.copy2(ROOT / "README.md", dest)
    shutil.copy2(ROOT / "requirements.lock", dest)
    shutil.copytree(
        ROOT / "worker", dest / "worker", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return dest


@dataclass(frozen=True)
class Image:
    venv: Path  # the virtualenv the worker was installed into
    context: Path  # the build context the wheel was built from


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """A fresh virtualenv holding the worker installed as the Dockerfile installs it."""
    tmp = tmp_path_factory.mktemp("image")
    # Per interpreter version too: the lock's markers pick wheels by it (async-timeout only
    # below 3.11.3, which Debian's 3.11.2 is).
    key = (ROOT / "pyproject.toml").read_bytes() + LOCK.read_bytes() + sys.version.encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    wheelhouse = cache_root() / f"wheelhouse-{digest}"
    complete = wheelhouse / ".complete"
    if not complete.exists():  # the build backend, for an isolated but offline build
        _pip("download", "--only-binary=:all:", "--dest", str(wheelhouse), *BUILD_REQUIRES)
    offline = ["--no-index", "--find-links", str(wheelhouse)]
    # Stage 1: the worker's wheel, built from exactly the build context.
    dist = tmp / "dist"
    context = _build_context(tmp / "src")
    _pip("wheel", "--no-deps", *offline, "--wheel-dir", str(dist), str(context))
    (wheel,) = dist.glob("tiktok_conversions_worker-*.whl")
    # Stage 1: every dependency as a binary wheel, from the lock, hash-checked (collected once
    # per pyproject.toml and lock).
    if not complete.exists():
        lock = str(context / "requirements.lock")
        _pip("wheel", "--require-hashes", "--only-binary=:all:", "--wheel-dir", str(wheelhouse),
             "-r", lock)  # fmt: skip
        complete.touch()
    # Stage 2: a virtualenv without pip, filled offline from the wheels: the locked set with
    # its hashes, then the worker without resolving anything, then a consistency check.
    target = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = str(target / "bin" / "python")
    lock = str(context / "requirements.lock")
    _pip("--python", python, "install", *offline, "--require-hashes", "-r", lock)
    _pip("--python", python, "install", "--no-index", "--no-deps", str(wheel))
    _pip("--python", python, "check")
    return Image(venv=target, context=context)


def _run(venv_dir: Path, *args: str, env: dict[str, str] | None = None, cwd: Path) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(venv_dir / "bin" / "tiktok-worker"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**clean, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.tools
def test_installed_console_script_reports_the_version(image: Image, tmp_path: Path) -> None:
    out = _run(image.venv, "--version", cwd=tmp_path)
    assert out.strip() == f"tiktok-worker {__version__}"
    assert not (image.venv / "bin" / "pip").exists()  # like the image: no pip in the venv


@pytest.mark.tools
def test_installed_package_is_complete(image: Image, tmp_path: Path) -> None:
    # Every module of the build context is in the wheel, and every import resolves from the venv.
    modules = sorted(
        ".".join(p.relative_to(image.context).with_suffix("").parts)
        for p in (image.context / "worker").rglob("*.py")
        if p.name != "__main__.py"
    )
    code = (
        "import importlib, sys, worker\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "assert not worker.__file__.startswith(sys.argv[1]), worker.__file__\n"
        "print(worker.__file__)"
    )
    proc = subprocess.run(
        [str(image.venv / "bin" / "python"), "-c", code, str(ROOT)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(image.venv) in proc.stdout


@pytest.mark.tools
def test_installed_package_holds_no_developer_tooling(image: Image) -> None:
    # The fake Events API, the sample events and the test/bench harnesses live in devkit/,
    # which is neither in the wheel nor in the image.
    site = next((image.venv / "lib").glob("python*/site-packages"))
    installed = [p.relative_to(site).as_posix() for p in site.rglob("*.py")]
    assert any(p.startswith("worker/") for p in installed)
    leaked = [
        p
        for p in installed
        if p.startswith(("devkit/", "tests/", "bench/"))
        or "fake_tiktok" in p
        or "sample_events" in p
    ]
    assert leaked == []


@pytest.mark.tools
def test_installed_worker_accepts_the_charts_config(image: Image, tmp_path: Path) -> None:
    (cm,) = [o for o in render() if o["kind"] == "ConfigMap"]
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    env = {"TIKTOK_ACCESS_TOKEN": "image-test-token-0123456789", "TIKTOK_PIXEL_CODE": "PIXEL1"}
    out = _run(image.venv, "check-config", "--config", str(path), env=env, cwd=tmp_path)
    assert "configuration OK" in out
    assert "image-test-token-0123456789" not in out


# --------------------------------------------------------------------------- static checks


def _stages() -> list[list[str]]:
    """Dockerfile instructions (continuations joined), split into build stages."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_on_debians_python() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG DEBIAN_IMAGE=debian:bookworm-slim$", text, flags=re.MULTILINE)
    python, build, runtime = _stages()
    assert python[0] == "FROM ${DEBIAN_IMAGE} AS python"
    assert build[0] == "FROM python AS build"
    assert runtime[0] == "FROM python AS runtime"
    assert any("pip wheel --no-deps" in line for line in build)
    # Dependencies only from the lock, hash-checked, in both stages (issue 19).
    assert any(ln == "ARG LOCK=requirements.lock" for ln in DOCKERFILE.read_text().splitlines())
    assert any("--require-hashes" in ln and "-r ${LOCK}" in ln for ln in build)
    runtime_install = "\n".join(runtime)
    assert "--require-hashes -r /wheels/requirements.lock" in runtime_install
    assert "--no-deps" in runtime_install


def test_image_runs_the_interpreter_build_setup_and_the_bench_use() -> None:
    # Issue 18: `make setup` builds .venv from Debian bookworm's python3.11 package, which
    # `make bench` then measures; the image installs that same package on bookworm, and
    # nothing else that could bring another interpreter (no python3 metapackage, no pip).
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^PYTHON \?= /usr/bin/python3\.11$", makefile, flags=re.MULTILINE)
    python = " ".join(_stages()[0])
    (install,) = re.findall(r"apt-get install -y --no-install-recommends ([^&]+)", python)
    assert install.split() == ["python3.11", "ca-certificates", "netbase", "tzdata"]
    runtime = "\n".join(_stages()[-1])
    assert "python3.11 -m venv --without-pip /opt/venv" in runtime
    assert "/opt/venv/bin/python /pip/pip.whl/pip install" in runtime


def test_final_stage_runs_tiktok_worker_as_non_root_without_build_tools() -> None:
    runtime = _stages()[-1]
    joined = "\n".join(runtime)
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users == ["10001:10001"]
    assert 'ENTRYPOINT ["tiktok-worker"]' in runtime
    assert 'CMD ["run", "--config", "/etc/tiktok-worker/config.yaml"]' in runtime
    assert "EXPOSE 9464" in runtime
    assert "--no-index" in joined
    for tool in ("apt-get", "gcc", "build-essential", "COPY --from=build /wheels"):
        assert tool not in joined, f"{tool} in the final stage"
    # pip runs from the build stage's mount and is never installed into /opt/venv.
    assert "--without-pip" in joined
    assert "! /opt/venv/bin/python -I -c 'import pip'" in joined


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    lines = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text().splitlines()
        if ln.strip()[:1] not in ("", "#")
    ]
    assert lines[0] == "**"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for stage in _stages():
        for line in stage:
            if line.startswith("COPY ") and "--from" not in line:
                copied |= set(line.split()[1:-1])
    assert (
        copied
        == allowed
        == {
            "pyproject.toml",
            "README.md",
            "requirements.lock",
            "requirements-aws.lock",
            "worker",
        }
    )


def test_chart_default_security_context_matches_the_image() -> None:
    values = yaml.safe_load(
        (ROOT / "helm" / "tiktok-conversions-worker" / "values.yaml").read_text()
    )
    runtime = _stages()[-1]
    (user,) = [line.split()[1] for line in runtime if line.startswith("USER ")]
    uid, gid = (int(x) for x in user.split(":"))
    assert values["securityContext"]["runAsUser"] == uid
    assert values["securityContext"]["runAsGroup"] == gid
    assert values["podSecurityContext"]["fsGroup"] == gid


# --------------------------------------------------------------------------- lock files


def _locked(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (pinned version, number of hashes) of a pip-style lock file."""
    text = path.read_text()
    out: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=\S)", text):
        m = re.match(r"([A-Za-z0-9_.-]+)==([^\s;\\]+)", block)
        if m:
            name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
            out[name] = (m.group(2), block.count("--hash=sha256:"))
    return out


def _requirements(*extras: str) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return reqs


@pytest.mark.parametrize(
    ("lock", "extras"), [(LOCK, ()), (DEV_LOCK, ("test", "dev"))], ids=["runtime", "dev"]
)
def test_lock_pins_every_requirement_within_its_bounds_with_hashes(
    lock: Path, extras: tuple[str, ...]
) -> None:
    from packaging.requirements import Requirement

    locked = _locked(lock)
    assert len(locked) >= 10
    assert all(count >= 1 for _version, count in locked.values()), "a pin without a hash"
    for text in _requirements(*extras):
        req = Requirement(text)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in locked, f"{req.name} is not in {lock.name}"
        assert req.specifier.contains(locked[name][0], prereleases=True), (text, locked[name])
    if lock == LOCK:  # the image gets no test or dev tools
        for tool in ("pytest", "ruff", "mypy", "uv"):
            assert tool not in locked


def test_runtime_lock_agrees_with_the_dev_lock() -> None:
    runtime, dev = _locked(LOCK), _locked(DEV_LOCK)
    assert {n: v for n, (v, _) in runtime.items() if dev.get(n, (None,))[0] != v} == {}


def test_msgspec_is_pinned_to_one_minor_version() -> None:
    from packaging.requirements import Requirement

    (msgspec_req,) = [r for r in _requirements() if r.startswith("msgspec")]
    spec = Requirement(msgspec_req).specifier
    version = _locked(LOCK)["msgspec"][0]
    major, minor = (int(x) for x in version.split(".")[:2])
    assert spec.contains(version)
    assert not spec.contains(f"{major}.{minor + 1}.0")  # its error text is parsed


def test_setup_and_ci_install_from_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r requirements-dev.lock" in makefile
    assert "--no-deps -e ." in makefile
    assert re.search(r"^lock:", makefile, flags=re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # CI runs setup, hence the lock


# --------------------------------------------------------------------------- make image


def _make_image(path: str, **env: str) -> subprocess.CompletedProcess[str]:
    make = shutil.which("make")
    assert make is not None
    return subprocess.run(
        [make, "--no-print-directory", "-C", str(ROOT), "image"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env},
        check=False,
    )


def _base_path(tmp_path: Path) -> str:
    """A PATH with bash, sed and make but no container builder (they live elsewhere here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sed", "head", "make", "env", "dirname"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def test_make_image_without_a_builder_says_so_in_one_line(tmp_path: Path) -> None:
    proc = _make_image(_base_path(tmp_path))
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("make image:")]
    assert ours == [
        "make image: no container builder found (docker, podman or buildah): install one, "
        "or build the Dockerfile on a machine that has one"
    ], proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("builder", ["docker", "podman", "buildah"])
def test_make_image_builds_with_the_builder_there_is(tmp_path: Path, builder: str) -> None:
    # A stand-in for the builder's CLI that records how it was called: the real build needs a
    # container engine, which this machine need not have.
    shims = tmp_path / "shims"
    shims.mkdir()
    calls = tmp_path / "calls"
    (shims / builder).write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (shims / builder).chmod(0o755)
    proc = _make_image(
        f"{shims}:{_base_path(tmp_path)}", IMAGE="registry.example.com/team/worker", TAG="1.2.3"
    )
    assert proc.returncode == 0, proc.stderr
    ref = "registry.example.com/team/worker:1.2.3"
    assert calls.read_text().splitlines()[-1] == f"build --tag {ref} --file Dockerfile ."
    assert proc.stdout.strip() == f"make image: built {ref} with {builder}"


def test_make_image_default_tag_is_the_version(tmp_path: Path) -> None:
    shims = tmp_path / "shims"
    shims.mkdir()
    calls = tmp_path / "calls"
    (shims / "podman").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (shims / "podman").chmod(0o755)
    proc = _make_image(f"{shims}:{_base_path(tmp_path)}")
    assert proc.returncode == 0, proc.stderr
    assert f"--tag tiktok-conversions-worker:{__version__} " in calls.read_text()


def test_readmes_start_the_install_from_building_and_pushing_the_image() -> None:
    chart_readme = (ROOT / "helm" / "tiktok-conversions-worker" / "README.md").read_text()
    install = chart_readme.split("## Install", 1)[1]
    first_block = install.split("```sh", 1)[1].split("```", 1)[0]
    assert "make image" in first_block
    assert "push" in first_block
    assert install.index("make image") < install.index("helm install")
    assert "--set image.repository=" in install
    readme = (ROOT / "README.md").read_text()
    assert "make image" in readme
    assert "push" in readme.split("make image", 1)[1][:800]


def _pins(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line):
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_aws_lock_is_the_base_lock_plus_the_msk_iam_signer() -> None:
    # `LOCK=requirements-aws.lock make image` must differ from the default image only by the
    # `aws` extra: the same pins for every shared package, every line hash-checked.
    base, aws = _pins(LOCK), _pins(ROOT / "requirements-aws.lock")
    assert {name: aws.get(name) for name in base} == base
    assert "aws-msk-iam-sasl-signer-python" in aws
    text = (ROOT / "requirements-aws.lock").read_text()
    for block in re.split(r"\n(?=[A-Za-z0-9_.-]+==)", text.split("\n", 1)[1]):
        if "==" in block.splitlines()[0]:
            assert "--hash=sha256:" in block, block.splitlines()[0]
