"""Debian packages the deploy and monitoring tests need, installed with apt-get where missing."""

from __future__ import annotations

import os
import shutil
import subprocess

APT_TIMEOUT_S = 600


class NotInstallable(Exception):
    """The packages cannot be installed here; the message says why."""


def find_tool(name: str) -> str | None:
    """The path of a command, also in /usr/sbin and /usr/bin where PATH lacks them."""
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )


def install(packages: list[str]) -> None:
    """`apt-get update` and `apt-get install` of `packages`; raises NotInstallable saying why not."""
    if os.geteuid() != 0:
        raise NotInstallable(f"{', '.join(packages)} missing, and installing them needs root")
    if shutil.which("apt-get") is None:
        raise NotInstallable(f"{', '.join(packages)} missing and no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S,
                                    check=False)
        except subprocess.TimeoutExpired:
            raise NotInstallable(f"`{' '.join(command)}` took longer than {APT_TIMEOUT_S} s") from None
        if result.returncode != 0:
            tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise NotInstallable(f"`{' '.join(command)}` exited {result.returncode}: {tail}")


def ensure_tools(tools: dict[str, str]) -> None:
    """Installs the packages of the missing ones of `tools` (command -> Debian package)."""
    missing = sorted({package for tool, package in tools.items() if find_tool(tool) is None})
    if missing:
        install(missing)
