"""Images for the container tests, made without an image registry.

The base images come from Debian packages: `debootstrap --variant=minbase` makes a root file
system with python3, python3-venv and redis-server, imported once as the Redis image and,
with Redis purged, as the Python base image. Both stay tagged in the engine and as tarballs
under /var/cache/apiary-test, so later runs on the machine skip debootstrap.

A service image is built from its target of the real Dockerfile with `BASE_IMAGE` set to that base and pip
told to install offline from a wheelhouse of the package's dependencies (downloaded on the
host for the base image's Python and platform, cached beside the tarballs).
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from deploy.apt import find_tool
from deploy.engine import Engine, EngineUnavailable
from deploy.files import DOCKERFILE, REPO, image_definition

CACHE = Path("/var/cache/apiary-test")
RECIPE = "bookworm-1"  # bump when the recipe below changes: cached images are then rebuilt
PYTHON_BASE = f"apiary-test/python:{RECIPE}"
REDIS_IMAGE = f"apiary-test/redis:{RECIPE}"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "python3-venv", "redis-server")
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEBOOTSTRAP_TIMEOUT_S = 420
OFFLINE = "--no-index --find-links /wheelhouse"


def image_exists(engine: Engine, image: str) -> bool:
    return engine.docker("image", "inspect", image, check=False, timeout=30).returncode == 0


def ensure_base_images(engine: Engine) -> None:
    """Tags PYTHON_BASE and REDIS_IMAGE in the engine: already there, from the cached tarballs,
    or made with debootstrap (about a minute)."""
    images = {PYTHON_BASE: CACHE / f"python-{RECIPE}.tar", REDIS_IMAGE: CACHE / f"redis-{RECIPE}.tar"}
    if all(image_exists(engine, image) for image in images):
        return
    if not all(tarball.exists() for tarball in images.values()):
        _debootstrap(images[PYTHON_BASE], images[REDIS_IMAGE])
    for image, tarball in images.items():
        command = ["python3"] if image == PYTHON_BASE else ["redis-server"]
        engine.docker("import", "--change", f"ENV {PATH}", "--change", f"CMD {json.dumps(command)}",
                      str(tarball), image, timeout=300)


def _debootstrap(python_tarball: Path, redis_tarball: Path) -> None:
    debootstrap = find_tool("debootstrap")
    if debootstrap is None:
        raise EngineUnavailable("debootstrap is not installed")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=CACHE) as rootfs:
        result = subprocess.run(
            [debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}", "bookworm", rootfs, MIRROR],
            capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT_S, check=False,
        )
        if result.returncode != 0:
            tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise EngineUnavailable(f"debootstrap from {MIRROR} failed ({result.returncode}): {tail}")
        _chroot(rootfs, "apt-get", "clean")
        _tar(rootfs, redis_tarball)
        _chroot(rootfs, "apt-get", "purge", "-y", "-qq", "--auto-remove", "redis-server", "redis-tools")
        _tar(rootfs, python_tarball)


def _chroot(rootfs: str, *command: str) -> None:
    subprocess.run(["chroot", rootfs, *command], check=True, capture_output=True, timeout=300)


def _tar(rootfs: str, tarball: Path) -> None:
    partial = tarball.with_suffix(".partial")
    subprocess.run(["tar", "--numeric-owner", "--exclude=./var/lib/apt/lists/*", "-C", rootfs, "-cf",
                    str(partial), "."], check=True, capture_output=True, timeout=300)
    partial.rename(tarball)


def torch_pin() -> str:
    """The torch release the Makefile pins (and the images install)."""
    return re.search(r'"torch==([^"]+)"', (REPO / "Makefile").read_text()).group(1)


def _requirements() -> list[str]:
    """What the images install: the package with its `ml` extra, the pinned torch, the build backend."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [*project["project"]["dependencies"], *project["project"]["optional-dependencies"]["ml"],
            f"torch=={torch_pin()}", *project["build-system"]["requires"]]


_PROBE = """
import json, os, platform, sys
print(json.dumps({
    "glibc": platform.libc_ver()[1],
    "markers": {
        "implementation_name": sys.implementation.name, "os_name": os.name,
        "platform_machine": platform.machine(), "platform_release": platform.release(),
        "platform_system": platform.system(), "platform_version": platform.version(),
        "platform_python_implementation": platform.python_implementation(),
        "implementation_version": platform.python_version(), "python_full_version": platform.python_version(),
        "python_version": ".".join(platform.python_version_tuple()[:2]), "sys_platform": sys.platform,
    },
}))
"""


def wheelhouse(engine: Engine, base_image: str) -> Path:
    """Wheels of the base package's dependencies (and its build backend) for the base image's
    Python and platform, downloaded on the host once per requirement set.

    pip evaluates environment markers for the interpreter it runs in, so the dependencies that
    only the image's Python needs are found from the wheels' metadata and fetched as well."""
    target = json.loads(engine.docker("run", "--rm", base_image, "python3", "-c", _PROBE, timeout=60).stdout)
    markers, glibc = target["markers"], target["glibc"]
    requirements = _requirements()
    key = hashlib.sha256(json.dumps([markers, glibc, requirements], sort_keys=True).encode()).hexdigest()[:16]
    wheels = CACHE / f"wheelhouse-{key}"
    if wheels.exists():
        return wheels
    machine = markers["platform_machine"]
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(17, int(glibc.split(".")[1]) + 1)]
    partial = Path(tempfile.mkdtemp(prefix="wheelhouse-", dir=CACHE))
    try:
        while requirements:
            _download(requirements, partial, markers["python_full_version"], [*platforms, f"manylinux2014_{machine}"])
            requirements = sorted(_unmet_requirements(partial, {**markers, "extra": ""}))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(wheels)
    for stale in CACHE.glob("wheelhouse-*"):  # those of earlier requirement sets
        if stale != wheels:
            shutil.rmtree(stale, ignore_errors=True)
    return wheels


def _download(requirements: list[str], directory: Path, python: str, platforms: list[str]) -> None:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version", python,
               "--implementation", "cp", "--dest", str(directory),
               *(f"--platform={platform}" for platform in platforms), *requirements]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise AssertionError(f"pip could not download wheels for Python {python} ({platforms[-1]}): {tail}")


def _unmet_requirements(directory: Path, environment: dict[str, str]) -> set[str]:
    """Requirements of the wheels in `directory`, for the target environment, that no wheel there meets."""
    wheels = list(directory.glob("*.whl"))
    present = {canonicalize_name(wheel.name.split("-")[0]) for wheel in wheels}
    unmet = set()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            metadata = email.parser.Parser().parsestr(archive.read(name).decode())
        for line in metadata.get_all("Requires-Dist") or []:
            requirement = Requirement(line)
            applies = requirement.marker is None or requirement.marker.evaluate(environment)
            if applies and canonicalize_name(requirement.name) not in present:
                requirement.marker = None
                unmet.add(str(requirement))
    return unmet


def build_context(service: str, wheels: Path, directory: Path) -> Path:
    """A build context holding exactly what the service's target of the Dockerfile copies, plus the wheels."""
    for arguments in image_definition(service).copies:
        for source in arguments[:-1]:
            origin, destination = REPO / source, directory / source
            if origin.is_dir():
                shutil.copytree(origin, destination, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
            else:
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, destination)
    shutil.copytree(wheels, directory / "services" / "wheelhouse", dirs_exist_ok=True)
    shutil.copy2(DOCKERFILE, directory / "Dockerfile")
    return directory


def build_service_image(engine: Engine, service: str, tag: str) -> None:
    """Builds the service's target of services/Dockerfile on the Debian base, installing from the wheelhouse."""
    wheels = wheelhouse(engine, PYTHON_BASE)
    with tempfile.TemporaryDirectory(prefix=f"apiary-{service}-context-") as directory:
        context = build_context(service, wheels, Path(directory))
        engine.docker("build", "--force-rm", "--build-arg", f"BASE_IMAGE={PYTHON_BASE}", "--build-arg",
                      f"PIP_INSTALL_ARGS={OFFLINE}", "--target", service, "-t", tag, "-f",
                      str(context / "Dockerfile"), str(context), timeout=600)
