"""Which local network interface serves an address (for UCX, gloo and NCCL, which bind by
interface name). Callers: ``kvtransfer.ucx`` (``NET_DEVICES``) and ``engine.runtime.rendezvous``
(``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``), so every byte of an instance moves on the
interface of the rank's ``--host``."""
from __future__ import annotations


def interface_of(host: str) -> str:
    """The name of the local network interface that owns IP address ``host`` ("" for a wildcard
    or empty host; a name is resolved first). Raises ValueError when no interface owns it."""
    import ipaddress
    import socket

    import psutil

    if host in ("", "0.0.0.0", "::", "*"):
        return ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = ipaddress.ip_address(socket.gethostbyname(host))
    if ip.is_loopback:
        ip = ipaddress.ip_address("127.0.0.1") if ip.version == 4 else ip
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            try:
                if ipaddress.ip_address(a.address.split("%")[0]) == ip:
                    return name
            except ValueError:
                continue
    if ip.is_loopback:  # 127.0.0.2 etc. live on the loopback device
        return next((n for n, addrs in psutil.net_if_addrs().items()
                     if any(a.address == "127.0.0.1" for a in addrs)), "")
    raise ValueError(f"no local network interface has the address {host!r}; pass the address "
                     f"this host serves on (--host)")
