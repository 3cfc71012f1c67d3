"""Neither end of a PostgreSQL connection waits for ever on a peer that vanished.

A network path that goes silent (a partition, a host powered off) sends no reset: by the
kernel's defaults a connection waits ~15 minutes for the acknowledgement of what it sent, and an
idle one for ever (a pooled connection is found dead only when used, then waits those 15
minutes). Each connection of hookledger's gives up on what stays unacknowledged for
`DEAD_PEER_S` (TCP_USER_TIMEOUT) and probes an idle peer (keepalive); and it asks the server
to probe it the same way, so that a hookledger host that vanished has its sessions ended, with
their transactions and locks. A query that runs long is not cut: the server's kernel
acknowledges it at once.
"""

from __future__ import annotations

import socket
from typing import Any

DEAD_PEER_S = 30
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 15, 5, 3  # dead within 30 s

# Sent at connect (asyncpg's server_settings): the server's side of the same probes.
SERVER_SETTINGS = {
    "tcp_keepalives_idle": str(KEEPALIVE_IDLE_S),
    "tcp_keepalives_interval": str(KEEPALIVE_INTERVAL_S),
    "tcp_keepalives_count": str(KEEPALIVE_COUNT),
}

# (level, option, value) where this platform has the option (TCP_USER_TIMEOUT is Linux's).
_OPTIONS = [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    *(
        (socket.IPPROTO_TCP, getattr(socket, name), value)
        for name, value in (
            ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
            ("TCP_KEEPCNT", KEEPALIVE_COUNT),
            ("TCP_USER_TIMEOUT", DEAD_PEER_S * 1000),
        )
        if hasattr(socket, name)
    ),
]


def tcp_socket(driver_connection: Any) -> socket.socket | None:
    """The TCP socket under an asyncpg connection (None over a Unix socket). asyncpg offers no
    socket options and no public way to its transport: its `_transport` is read, and a test
    (tests/test_liveness.py) says so if that ever changes."""
    transport = getattr(driver_connection, "_transport", None)
    sock: socket.socket | None = (
        transport.get_extra_info("socket") if transport is not None else None
    )
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return sock


def watch_peer(driver_connection: Any) -> None:
    """Set the probes and the limit on a new connection's socket."""
    sock = tcp_socket(driver_connection)
    if sock is not None:
        for level, option, value in _OPTIONS:
            sock.setsockopt(level, option, value)
