"""Container health probe: GET an admin route of the service in this container.

    python /opt/apiary/healthcheck.py /healthz

Exits 0 when the route answers 200, else 1 with one line on stderr. It reads the admin
address from the service's own settings (APIARY_ADMIN_HOST, APIARY_ADMIN_PORT) and uses only
the standard library, so it runs in every apiary image.
"""

import os
import sys
import urllib.error
import urllib.request

WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def admin_url(path: str) -> str:
    host = os.environ.get("APIARY_ADMIN_HOST", "127.0.0.1")
    host = "127.0.0.1" if host in WILDCARD_HOSTS else host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{os.environ.get('APIARY_ADMIN_PORT', '9100')}{path}"


def main() -> int:
    url = admin_url(sys.argv[1] if len(sys.argv) > 1 else "/healthz")
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (OSError, urllib.error.URLError) as error:
        print(f"apiary healthcheck: {url}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
