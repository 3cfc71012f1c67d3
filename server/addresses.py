"""Which destinations the dispatcher may connect to (SSRF), checked on the URL and on every socket.

The URL check at configuration time is early feedback; the authority is the check on the
resolved address the socket actually connects to, which DNS rebinding cannot slip past.
"""

from __future__ import annotations

import ipaddress
import re
import socket

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.connector import AddrInfoType, SocketFactoryType
from aiohttp.resolver import DefaultResolver

__all__ = [
    "DestinationRefused",
    "SafeResolver",
    "check_destination_url",
    "check_header_value",
    "make_connector",
    "refusal_reason",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_net = ipaddress.ip_network

# Instance metadata services: refused even when private destinations are allowed.
_METADATA_HOSTS = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle, Hetzner
        "169.254.170.2",  # AWS ECS task metadata
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure WireServer (a public address on Azure's host)
        "192.0.0.192",  # Oracle Cloud, legacy
    )
)
_METADATA_NETS = (_net("fd00:ec2::/32"),)  # AWS IMDS/DNS/NTP over IPv6 (fd00:ec2::254)

# (network, label, refused even when private destinations are allowed); the first match decides.
_RANGES: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str, bool], ...] = (
    (_net("169.254.0.0/16"), "a link-local", True),
    (_net("fe80::/10"), "a link-local", True),
    (_net("0.0.0.0/8"), "an unspecified", True),
    (_net("::/128"), "an unspecified", True),
    (_net("::1/128"), "a loopback", False),  # before ::/96, which holds it
    (_net("224.0.0.0/4"), "a multicast", True),
    (_net("ff00::/8"), "a multicast", True),
    (_net("240.0.0.0/4"), "a reserved", True),  # includes 255.255.255.255
    (_net("192.0.0.0/24"), "a reserved", True),  # IETF protocol assignments
    (_net("192.88.99.0/24"), "a reserved", True),  # deprecated 6to4 relay anycast
    (_net("192.0.2.0/24"), "a documentation", True),
    (_net("198.51.100.0/24"), "a documentation", True),
    (_net("203.0.113.0/24"), "a documentation", True),
    (_net("2001:db8::/32"), "a documentation", True),
    (_net("3fff::/20"), "a documentation", True),
    (_net("100::/64"), "a reserved", True),  # discard-only
    (_net("2001::/23"), "a reserved", True),  # IETF protocol assignments, Teredo
    (_net("::/96"), "a reserved", True),  # deprecated IPv4-compatible
    (_net("127.0.0.0/8"), "a loopback", False),
    (_net("10.0.0.0/8"), "a private", False),
    (_net("172.16.0.0/12"), "a private", False),
    (_net("192.168.0.0/16"), "a private", False),
    (_net("100.64.0.0/10"), "a shared (CGNAT)", False),
    (_net("198.18.0.0/15"), "a benchmarking", False),
    (_net("fc00::/7"), "a unique local", False),
    (_net("fec0::/10"), "a site-local", False),
    (_net("64:ff9b:1::/48"), "a local-use NAT64", False),
)
_GLOBAL_UNICAST_V6 = _net("2000::/3")
_LINK_LOCAL_V4 = _net("169.254.0.0/16")

# Wrappers whose packets really go to the IPv4 address inside: judged by that address alone.
_MAPPED = _net("::ffff:0:0/96")
_TRANSLATED = _net("::ffff:0:0:0/96")
_NAT64 = _net("64:ff9b::/96")
_SIX_TO_FOUR = _net("2002::/16")
_TRANSPARENT = (_MAPPED, _TRANSLATED, _NAT64, _SIX_TO_FOUR)
_LOCAL_NAT64 = _net("64:ff9b:1::/48")
_COMPATIBLE = _net("::/96")

_HOSTNAME = re.compile(r"[a-z0-9_.-]+", re.IGNORECASE)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+", re.IGNORECASE)
_FORBIDDEN_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_MAX_URL_LENGTH = 2048


class DestinationRefused(Exception):
    """A destination, or a header sent to it, that the dispatcher must not use.

    Deliberately not an OSError: aiohttp wraps OSErrors from the resolver into
    ClientConnectorError (a transient class); this one reaches the caller as itself.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"destination refused: {self.reason}"


def refusal_reason(ip: IPAddress, *, allow_private: bool) -> str | None:
    """Why `ip` must not be connected to, or None when it may be."""
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ipaddress.IPv6Address(int(ip))  # a zone id changes nothing and breaks comparisons
        inner = _embedded_ipv4(ip)
        if inner is not None:
            reason = _own_reason(inner, allow_private=allow_private)
            if reason is not None:
                return f"{reason} (inside {ip})"
            if any(ip in net for net in _TRANSPARENT):
                return None
        elif ip in _LOCAL_NAT64:
            reason = _local_nat64_reason(ip)
            if reason is not None:
                return reason
    return _own_reason(ip, allow_private=allow_private)


def _own_reason(ip: IPAddress, *, allow_private: bool) -> str | None:
    if _is_metadata(ip):
        return f"{ip} is a cloud metadata address"
    for net, label, always in _RANGES:
        if ip in net:
            return f"{ip} is {label} address" if always or not allow_private else None
    if isinstance(ip, ipaddress.IPv6Address) and ip not in _GLOBAL_UNICAST_V6:
        return f"{ip} is a reserved address"
    return None


def _is_metadata(ip: IPAddress) -> bool:
    return ip in _METADATA_HOSTS or any(ip in net for net in _METADATA_NETS)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a mapped, translated, NAT64, 6to4, compatible or Teredo address leads to."""
    is_compatible = ip in _COMPATIBLE and int(ip) > 1  # ::, ::1 are not wrappers
    if is_compatible or any(ip in net for net in (_MAPPED, _TRANSLATED, _NAT64)):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # (server, client): packets go to the client
    return None


def _local_nat64_reason(ip: ipaddress.IPv6Address) -> str | None:
    """Refuse a local-use NAT64 address that may lead to metadata or link-local.

    RFC 6052 lets the operator pick the prefix length inside the /48, so every placement is
    tried. Only the dangerous ranges count: the wrong placements read bytes that are no
    address, and judging them fully would refuse ordinary destinations.
    """
    packed = ip.packed
    without_u_octet = packed[:8] + packed[9:]  # bits 64-71 are never part of the address
    placements = [without_u_octet[start : start + 4] for start in (6, 7, 8)] + [packed[12:]]
    for raw in placements:
        inner = ipaddress.IPv4Address(raw)
        if _is_metadata(inner) or inner in _LINK_LOCAL_V4:
            return f"{inner} is a metadata or link-local address (inside {ip})"
    return None


def _address_reason(host: str, *, allow_private: bool) -> str | None:
    """Judge a numeric address string as a resolver or socket reports it."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{host!r} is not an IP address"
    return refusal_reason(ip, allow_private=allow_private)


def check_destination_url(url: str, *, allow_private: bool) -> None:
    """Refuse a destination URL at configuration time; hostnames are judged again on connect."""
    if len(url) > _MAX_URL_LENGTH:
        raise DestinationRefused(f"URL is longer than {_MAX_URL_LENGTH} characters")
    if _FORBIDDEN_URL_CHARS.search(url):
        raise DestinationRefused("URL contains whitespace, control characters or a backslash")
    parsed = _parse_url(url)
    if parsed.scheme not in ("http", "https"):
        raise DestinationRefused("only http and https destinations are allowed")
    if parsed.raw_user is not None or parsed.raw_password is not None or "@" in _authority(url):
        raise DestinationRefused("credentials in the URL are not allowed")
    if not parsed.raw_host:
        raise DestinationRefused("URL has no host")
    if parsed.explicit_port == 0:
        raise DestinationRefused("port 0 is not a destination")
    reason = _host_reason(parsed.raw_host, allow_private=allow_private)
    if reason is not None:
        raise DestinationRefused(reason)


def _parse_url(url: str) -> yarl.URL:
    # yarl is what aiohttp will connect with, so its reading of the host is the one to judge.
    try:
        parsed = yarl.URL(url)
        _ = parsed.explicit_port  # parsed lazily; may raise for a bad port
    except (ValueError, TypeError) as exc:  # UnicodeError (IDNA) is a ValueError
        raise DestinationRefused(f"not a valid URL: {exc}") from None
    except IndexError:  # yarl 1.25's own slip on brackets before an empty host ("http://[]@")
        raise DestinationRefused("not a valid URL: its host cannot be read") from None
    return parsed


def _authority(url: str) -> str:
    after_scheme = url.partition("://")[2]
    return re.split(r"[/?#]", after_scheme, maxsplit=1)[0]


def _host_reason(host: str, *, allow_private: bool) -> str | None:
    if ":" in host:
        return _address_reason(host, allow_private=allow_private)
    if not _HOSTNAME.fullmatch(host):
        return f"{host!r} is not a valid host name"
    name = host.removesuffix(".").lower()
    numeric = _legacy_ipv4(name)
    if numeric is not None:
        return refusal_reason(numeric, allow_private=allow_private)
    if not allow_private and (name == "localhost" or name.endswith(".localhost")):
        return f"{host} is a loopback name"  # RFC 6761: always resolves to loopback
    return None


def _legacy_ipv4(name: str) -> ipaddress.IPv4Address | None:
    """The address getaddrinfo makes of `2130706433`, `0x7f.1`, `127.1`, `0177.0.0.1`."""
    try:
        return ipaddress.IPv4Address(socket.inet_aton(name))
    except (OSError, ValueError):
        return None


def check_header_value(name: str, value: str) -> None:
    """Refuse a header that could split the request: CR, LF or NUL, or a name that is no token."""
    if not _TOKEN.fullmatch(name):
        raise DestinationRefused(f"header name {name!r} is not a valid token")
    if any(char in value for char in "\r\n\x00"):
        # The value itself stays out of the message: it may be a signature or a token.
        raise DestinationRefused(f"header {name!r} value contains CR, LF or NUL")


class SafeResolver(AbstractResolver):
    """Resolves with aiohttp's default resolver and keeps only addresses that may be used."""

    def __init__(self, *, allow_private: bool, resolver: AbstractResolver | None = None) -> None:
        self._allow_private = allow_private
        self._resolver = resolver if resolver is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        reasons = [_address_reason(r["host"], allow_private=self._allow_private) for r in results]
        kept = [r for r, reason in zip(results, reasons, strict=True) if reason is None]
        if not kept:
            refused = "; ".join(r for r in reasons if r is not None) or "no address"
            raise DestinationRefused(f"{host} resolves to no allowed address ({refused})")
        return kept

    async def close(self) -> None:
        await self._resolver.close()


class _SafeConnector(aiohttp.TCPConnector):
    """A TCPConnector that also closes the resolver it was given (aiohttp leaves that to us)."""

    def __init__(self, *, allow_private: bool, limit: int, limit_per_host: int) -> None:
        self._safe_resolver = SafeResolver(allow_private=allow_private)
        super().__init__(
            resolver=self._safe_resolver,
            socket_factory=_guarded_socket_factory(allow_private=allow_private),
            limit=limit,
            limit_per_host=limit_per_host,
        )

    async def close(self, *, abort_ssl: bool = False) -> None:
        try:
            await super().close(abort_ssl=abort_ssl)
        finally:
            await self._safe_resolver.close()


def _guarded_socket_factory(*, allow_private: bool) -> SocketFactoryType:
    """Last line: judge the address each socket is created for, IP-literal hosts included.

    aiohttp hands IP-literal hosts straight to the socket without asking the resolver.
    """

    def create_socket(addr_info: AddrInfoType) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        reason = _address_reason(str(sockaddr[0]), allow_private=allow_private)
        if reason is not None:
            raise DestinationRefused(reason)
        return socket.socket(family=family, type=type_, proto=proto)

    return create_socket


def make_connector(
    *, allow_private: bool, limit: int = 100, limit_per_host: int = 8
) -> aiohttp.TCPConnector:
    """The connector every dispatch goes through; call it inside the running event loop.
    `limit`: connections in all (aiohttp's own default, 100, unless the caller's concurrency is
    more: an attempt past it would wait for a connection inside its own timeout)."""
    return _SafeConnector(allow_private=allow_private, limit=limit, limit_per_host=limit_per_host)
