"""A network-namespace test harness: hosts with their own addresses and shaped links on one
machine. `net.network` (Network, Host, Link, skip_reason) builds them; `net.relay` adds
latency, jitter, loss and dial-out-only filtering in user space; `net.nat` puts hosts behind
real NATs (router namespaces, iptables); `net.tools` measures;
`net.trainers`, `net.experts` and `net.moe_client` run participants on the hosts.

Kept free of imports: the relay and the tools run as `python -m net.<module>` on every link
and host, and should not pay for importing grpc or torch.
"""
