"""Addresses: whether a host is this machine's loopback interface (no dependencies, for the server and the clients)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a URL's host, or an address or name to bind) is the loopback interface.

    ``localhost`` and loopback addresses only: another name that may resolve to 127.0.0.1 (``*.localhost``, an
    ``/etc/hosts`` entry) is not trusted, since the server skips its token on loopback and the clients skip the
    proxy.

    >>> [is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost", "0.0.0.0", "10.0.0.1", None)]
    [True, True, True, True, True, False, False, False]
    """
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
