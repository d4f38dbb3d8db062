"""Relays: reaching a peer that cannot be dialled (behind a NAT or a firewall).

A public peer started with `WireSettings.relay` runs a `RelayServer` on its own port. A peer
behind NAT keeps reservations there (`Reservations`): outbound control connections on which it
proved its peer id (a signature over the relay's nonce and peer id) and that stay open with
keepalives. Others reach it at a relayed endpoint, `<relay-host>:<relay-port>/via/<relay>/to/<peer>`
(`apiary.wire.address`). A dialer asks the relay to `Connect` it to the target (in a private
run with its token credentials, audience the relay); the relay sends `Incoming` over the
target's reservation; the target opens a NEW outbound connection to the relay and `Accept`s
(signed); the relay splices the two sockets, raw bytes both ways, and tells the dialer
`Connected` (`protocol`, relay.proto).

Why one TCP connection per circuit, with the reservation carrying control only: multiplexing
circuits over the reservation would put a gRPC call behind a 1 GiB bulk transfer in one TCP
stream (head-of-line blocking) and need a flow-control window per circuit in user space; with
a connection each, the kernel's TCP flow control paces every circuit on its own, the relay
only copies bytes between two sockets (`splice`), and a circuit's failure ends that circuit
alone. The cost is one connection set-up per circuit, which gRPC channels and the bulk
transport amortise by keeping their connections open.

TLS stays end to end: the dialer speaks TLS to the target over the circuit, bound to the
target's peer id (`apiary.wire.tls`), so the relay carries ciphertext only and cannot answer as
the target. The control frames themselves are not encrypted: what they carry is signed (reserve,
accept) or a private run's signed credentials (connect), bound to this relay and connection.

The relay's limits (`WireSettings.relay_*`): reservations, circuits in all and per dialing host,
bytes per second per circuit and in all (token buckets), idle timeouts of circuits and
reservations; each refusal is a frame naming the limit, raised by the dialer as the
`WireError` its status maps to, and counted by reason (`<prefix>_relay_refused_total`).

Dialing: `ChannelPool` points a relayed endpoint's gRPC channel at a local `Forwarder` that
opens a circuit per connection; `BulkClient` opens a circuit per bulk connection (`open_circuit`).
A circuit's kind (grpc, bulk, punch) tells the target where to splice it. Peers that reach
each other through a relay move to a direct connection when hole punching works (`punch`).
"""

from apiary.wire.relay.dial import open_circuit
from apiary.wire.relay.forward import Forwarder
from apiary.wire.relay.reservations import Reservations
from apiary.wire.relay.server import RelayServer

__all__ = ["Forwarder", "RelayServer", "Reservations", "open_circuit"]
