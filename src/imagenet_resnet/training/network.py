"""Which network interface the nodes of a torchrun job reach each other through: gloo binds, unless told
(GLOO_SOCKET_IFNAME), the address the machine's name resolves to, a loopback one on Debian's and Ubuntu's default
/etc/hosts, which no other node can reach (docs/cloud.md, "The network between the nodes")."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from pathlib import Path

from ..errors import UserError


def choose_gloo_interface(is_main: bool) -> None:
    """Set GLOO_SOCKET_IFNAME for this process, before any gloo group is made: left unset, gloo binds the
    address this machine's name resolves to, a loopback address on Debian's and Ubuntu's default /etc/hosts
    (127.0.1.1), which the other nodes cannot reach, and they wait for the whole connect timeout."""
    master = os.environ["MASTER_ADDR"]
    try:
        interface = gloo_interface(master)
    except OSError as e:  # MASTER_ADDR does not resolve, or no route leads there
        interface, why = None, f"{type(e).__name__}: {e}"
    else:
        why = "no interface holds the address this machine sends from"
    if interface is None:
        loopback = _name_resolves_to_loopback()
        if loopback:
            raise UserError(f"cannot tell which network interface reaches MASTER_ADDR {master} ({why}), and "
                            f"this machine's name {socket.gethostname()} resolves to {loopback}, which the "
                            "other nodes cannot reach: set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME on "
                            "GPUs) on every node to the interface of the nodes' network (`ip -brief address` "
                            "lists them), e.g. GLOO_SOCKET_IFNAME=eth0")
        return  # gloo's own choice, the address this machine's name resolves to, is not a loopback one
    os.environ["GLOO_SOCKET_IFNAME"] = interface
    if is_main:
        print(f"GLOO_SOCKET_IFNAME={interface} (the interface that reaches MASTER_ADDR {master}; set "
              "GLOO_SOCKET_IFNAME on every node to choose another)", flush=True)


def gloo_interface(master_addr: str) -> str | None:
    """The name of the network interface through which this machine reaches `master_addr` (a name or an
    address), or None when no interface holds the address it would send from. Raises OSError when the name
    does not resolve or no route leads there.

    A name that resolves to a loopback address here (node 0's own name on Debian's /etc/hosts, which the
    other nodes resolve to its real address) means the interface of the default route, the one the other
    nodes reach this machine through; only a loopback address itself, or localhost, means the loopback
    interface: every node is on this machine."""
    family, _, _, _, address = socket.getaddrinfo(master_addr, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(address)  # UDP: the kernel picks the route and the source address; nothing is sent
        source = ipaddress.ip_address(probe.getsockname()[0])
    if not source.is_loopback:
        return _interfaces().get(source)
    if master_addr == "localhost" or _is_loopback_address(master_addr):
        return _interfaces().get(ipaddress.ip_address("127.0.0.1" if source.version == 4 else "::1"))
    return _default_route_interface()


def _is_loopback_address(text: str) -> bool:
    try:
        return ipaddress.ip_address(text.strip("[]")).is_loopback
    except ValueError:  # a name
        return False


def _interfaces() -> dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str]:
    """Each address of this machine's interfaces (Linux: the first IPv4 address of each, all IPv6 ones) and
    its interface's name."""
    found = {}
    SIOCGIFADDR = 0x8915  # <linux/sockios.h>: an interface's IPv4 address
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                reply = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address
                continue
            found[ipaddress.ip_address(reply[20:24])] = name
    inet6 = Path("/proc/net/if_inet6")  # address (32 hex digits), index, prefix, scope, flags, name
    for line in inet6.read_text().splitlines() if inet6.exists() else []:
        fields = line.split()
        found[ipaddress.ip_address(bytes.fromhex(fields[0]))] = fields[5]
    return found


def _default_route_interface() -> str | None:
    """The interface of this machine's IPv4 default route (Linux's /proc/net/route), or None."""
    routes = Path("/proc/net/route")  # Iface, Destination, Gateway, ... in hex; the default's destination is 0
    for line in routes.read_text().splitlines()[1:] if routes.exists() else []:
        fields = line.split()
        if int(fields[1], 16) == 0:
            return fields[0]
    return None


def _name_resolves_to_loopback() -> str | None:
    """The loopback address this machine's name resolves to (or "nothing" when it does not resolve, where
    gloo falls back to the loopback address), else None."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return "nothing"
    return ", ".join(sorted(addresses)) if all(_is_loopback_address(a) for a in addresses) else None
