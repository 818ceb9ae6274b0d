"""No network unless the user asks: with ``ICM_NO_NETWORK=1`` in the environment, importing ``icm_helpers`` blocks
every outgoing connection to a non-loopback address at the socket level (``socket.connect`` / ``connect_ex`` /
``create_connection`` / ``getaddrinfo`` of non-local names raise ``NetworkBlocked``). Loopback stays open: Jupyter
kernels talk to papermill over 127.0.0.1. ``make test`` runs the unit tests and the whole smoke profile this way,
which proves that the suite never needs the network on its default paths.
"""
from __future__ import annotations

import ipaddress
import os
import socket

ENV_VAR = "ICM_NO_NETWORK"
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


class NetworkBlocked(OSError):
    pass


def _is_local(host) -> bool:
    if host is None:
        return True
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _check(address, family=None) -> None:
    if family == getattr(socket, "AF_UNIX", object()) or not isinstance(address, tuple):
        return  # Unix sockets / non-IP addresses
    if not _is_local(address[0]):
        raise NetworkBlocked(
            f"network access to {address[0]!r} is blocked ({ENV_VAR}=1): the suite needs no network on "
            f"this path. To download weights or data, unset {ENV_VAR} and pass download=True."
        )


def block_network() -> None:
    """Install the block in this process (idempotent)."""
    if getattr(socket.socket, "_icm_blocked", False):
        return
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def guarded_connect(self, address):
        _check(address, self.family)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        _check(address, self.family)
        return connect_ex(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _is_local(host):
            _check((host, 0))
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex = guarded_connect, guarded_connect_ex
    socket.getaddrinfo = guarded_getaddrinfo
    socket.socket._icm_blocked = True


def install_from_env() -> None:
    if os.environ.get(ENV_VAR) == "1":
        block_network()
