"""Finds the address a pod announces to other participants, before its apiary service starts.

Run by the chart's `announce` init container (the dht image's python, standard library only):

    announce.py loadbalancer   the external address of the pod's own LoadBalancer Service (named as
                               the pod), from the Service's status, waiting until the cloud assigns it
    announce.py node           the ExternalIP (else ExternalDNS) of the node the pod runs on

A host set in the values for this pod (the JSON object in ANNOUNCE_HOSTS, keyed by pod name)
wins without asking the API. The result is written as a shell line exporting APIARY_ANNOUNCE_HOST
(--out), which the service's container reads before `exec apiary <service>`. The API is read with
the pod's service account token, each request with a deadline, retried until --timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
HOST = re.compile(r"^(\[?[0-9A-Fa-f:.]+\]?|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)$")


class NotYet(Exception):
    """The address is not known yet (the load balancer is being created)."""


def api_get(path: str, account: Path, api: str, deadline: float) -> dict:
    """GET a Kubernetes API object as JSON, with the service account's token and CA."""
    context = ssl.create_default_context(cafile=str(account / "ca.crt"))
    request = urllib.request.Request(f"{api}{path}", headers={
        "Authorization": f"Bearer {(account / 'token').read_text().strip()}", "Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=deadline, context=context) as response:
        return json.load(response)


def load_balancer_host(service: dict) -> str:
    ingress = service.get("status", {}).get("loadBalancer", {}).get("ingress") or []
    for entry in ingress:
        if entry.get("ip") or entry.get("hostname"):
            return entry.get("ip") or entry["hostname"]
    raise NotYet(f"Service {service['metadata']['name']} has no external address yet")


def node_host(node: dict) -> str:
    addresses = {a["type"]: a["address"] for a in node.get("status", {}).get("addresses", [])}
    for kind in ("ExternalIP", "ExternalDNS"):
        if addresses.get(kind):
            return addresses[kind]
    raise SystemExit(f"node {node['metadata']['name']} has no ExternalIP or ExternalDNS address (only "
                     f"{sorted(addresses)}): peers cannot reach it; use exposure.mode LoadBalancer or relayed")


def find_host(mode: str, account: Path, api: str, timeout: float, period: float) -> str:
    pod = os.environ["POD_NAME"]
    explicit = json.loads(os.environ.get("ANNOUNCE_HOSTS") or "{}").get(pod)
    if explicit:
        return explicit
    namespace = (account / "namespace").read_text().strip()
    path = (f"/api/v1/namespaces/{namespace}/services/{pod}" if mode == "loadbalancer"
            else f"/api/v1/nodes/{os.environ['NODE_NAME']}")
    give_up = time.monotonic() + timeout
    while True:
        try:
            found = api_get(path, account, api, deadline=10)
            return load_balancer_host(found) if mode == "loadbalancer" else node_host(found)
        except (NotYet, urllib.error.URLError, OSError) as e:
            if time.monotonic() + period > give_up:
                raise SystemExit(f"no address to announce for {pod} after {timeout:.0f} s: {e}") from None
            print(f"waiting for the address of {pod}: {e}", file=sys.stderr, flush=True)
            time.sleep(period)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["loadbalancer", "node"])
    parser.add_argument("--out", type=Path, required=True, help="the shell file to write")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the address")
    parser.add_argument("--period", type=float, default=5, help="seconds between readings")
    parser.add_argument("--service-account", type=Path, default=Path(SERVICE_ACCOUNT))
    api_host = os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
    api_host = f"[{api_host}]" if ":" in api_host else api_host
    parser.add_argument("--api", default=f"https://{api_host}:{os.environ.get('KUBERNETES_SERVICE_PORT', '443')}")
    args = parser.parse_args(argv)
    host = find_host(args.mode, args.service_account, args.api, args.timeout, args.period)
    if not HOST.match(host):
        raise SystemExit(f"{host!r} is not a host name or IP address")
    args.out.write_text(f"export APIARY_ANNOUNCE_HOST='{host.strip('[]')}'\n")
    print(f"{os.environ['POD_NAME']} announces {host}", flush=True)


if __name__ == "__main__":
    main()
