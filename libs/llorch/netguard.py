"""Address checks for outbound fetches (SPEC §5.9): which IP a host names, and whether it is public.

A fetch tool that a client can point anywhere must not become a way into the LAN, the loopback
services or a cloud metadata endpoint. This module answers two questions, with no I/O but the one
name resolution of :func:`resolve`:

- :func:`parse_host_ip` reads a URL host as an IP literal in every form a resolver or a browser
  would accept: dotted quads, the shortened and numeric forms of ``inet_aton`` (``127.1``,
  ``2130706433``, ``0x7f.1``, ``0177.0.0.1``) and IPv6 (with a zone id, bracketed or not).
- :func:`blocked_reason` says why an address must not be reached (``loopback``, ``private``,
  ``link-local``, ``cgnat``, ``multicast``, ``unspecified``, ``metadata``, ``reserved``), or None for a
  public address. IPv6 forms that carry an IPv4 address (mapped, compatible, NAT64, 6to4, Teredo) are
  judged by the IPv4 address inside as well as by their own range.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], Awaitable[list[str]]]
"""``resolve(host, port)`` → the host's addresses as strings (the seam tests replace)."""

METADATA: Final[frozenset[IPAddress]] = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack
        ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
    }
)
_CGNAT: Final = ipaddress.ip_network("100.64.0.0/10")
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL: Final = ipaddress.ip_network("64:ff9b:1::/48")
_COMPAT: Final = ipaddress.ip_network("::/96")
_HOST_CHARS: Final = re.compile(r"^[A-Za-z0-9._-]+$")
_NUMBER: Final = re.compile(r"^(0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*)$")


class HostError(ValueError):
    """The URL host is neither a valid IP literal nor a plausible DNS name."""


def _inet_aton_part(text: str) -> int | None:
    if not _NUMBER.match(text):
        return None
    if text[:2] in ("0x", "0X"):
        return int(text[2:] or "0", 16)
    if text.startswith("0") and len(text) > 1:
        return int(text[1:], 8)
    return int(text)


def _inet_aton(host: str) -> ipaddress.IPv4Address | None:
    """The address ``inet_aton`` would read from ``host`` (1 to 4 numeric parts), else None."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers = [_inet_aton_part(p) for p in parts]
    if any(n is None for n in numbers):
        return None
    values = [n for n in numbers if n is not None]
    *head, last = values
    if any(v > 0xFF for v in head) or last >= 1 << (8 * (5 - len(values))):
        raise HostError("a numeric IPv4 host has a part out of range")
    value = 0
    for v in head:
        value = value << 8 | v
    value = value << (8 * (4 - len(head))) | last
    return ipaddress.IPv4Address(value)


def parse_host_ip(host: str) -> IPAddress | None:
    """The IP address ``host`` (a URL host, without port) names literally, else None for a DNS name.

    Raises :class:`HostError` for a host that is neither (empty, odd characters, an IPv4 form out of
    range), so that no such host is ever handed to a resolver that may read it differently.
    """
    text = host.strip("[]").rstrip(".") if host.startswith("[") else host.rstrip(".")
    if not text:
        raise HostError("the URL has no host")
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError:
            raise HostError("the host is not a valid IPv6 address") from None
    if not _HOST_CHARS.match(text):
        raise HostError("the host has characters a DNS name cannot have")
    return _inet_aton(text)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped, compatible, NAT64, 6to4, Teredo client)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64 or address in _COMPAT:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _ipv4_reason(address: ipaddress.IPv4Address) -> str | None:
    if address in METADATA:
        return "metadata"
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("cgnat", address in _CGNAT),
        ("private", address.is_private),
    )
    for reason, hit in checks:
        if hit:
            return reason
    return None if address.is_global else "reserved"


def blocked_reason(address: IPAddress) -> str | None:
    """Why ``address`` must not be fetched from by default, or None when it is a public address."""
    if isinstance(address, ipaddress.IPv4Address):
        return _ipv4_reason(address)
    if address in METADATA:
        return "metadata"
    if address.is_unspecified or address.is_loopback:  # before ::/96, which would read them as IPv4
        return "unspecified" if address.is_unspecified else "loopback"
    inner = _embedded_ipv4(address)
    if inner is not None and (reason := _ipv4_reason(inner)) is not None:
        return reason
    if address in _NAT64_LOCAL:
        return "private"
    checks = (
        ("link-local", address.is_link_local or address.is_site_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
    )
    for reason, hit in checks:
        if hit:
            return reason
    if inner is not None:  # NAT64/6to4/Teredo of a public IPv4 address: judged by that address
        return None
    return None if address.is_global else "reserved"


async def system_resolve(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver, once (every address, IPv4 and IPv6)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0]).split("%", 1)[0]
        if address not in seen:
            seen.append(address)
    return seen
