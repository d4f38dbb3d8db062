"""Makes sure a `redis-server` binary is available for the Redis storage tests.

Run as `python -m tests.tools.ensure_redis`. It always exits 0: where Redis cannot be
installed, it says why and the Redis tests are skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# Debian's package puts the binary in /usr/bin; a minimal PATH may still miss it.
_FALLBACK_PATHS = ("/usr/bin/redis-server", "/usr/local/bin/redis-server", "/usr/sbin/redis-server")
_APT_TIMEOUT_S = 600


def find_redis_server() -> str | None:
    """The path of a runnable `redis-server`, or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    for path in _FALLBACK_PATHS:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _apt_install() -> str | None:
    """Installs redis-server with apt-get; returns why it could not, or None on success."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = [
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"],
    ]
    for command in steps:
        try:
            result = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=_APT_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            return f"`{' '.join(command)}` took longer than {_APT_TIMEOUT_S} s"
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            return f"`{' '.join(command)}` exited {result.returncode}: {' | '.join(tail)}"
    return None


def main() -> int:
    path = find_redis_server()
    if path:
        print(path)
        return 0
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        reason = "not running as root, so apt-get cannot install redis-server"
    elif shutil.which("apt-get") is None:
        reason = "apt-get is not available to install redis-server"
    else:
        print("redis-server not found: installing it with apt-get ...", file=sys.stderr)
        reason = _apt_install()
        path = find_redis_server()
        if path:
            print(path)
            return 0
        reason = reason or "apt-get succeeded but no redis-server binary was found afterwards"
    print(f"redis-server is not installed ({reason}); the Redis storage tests will be skipped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
