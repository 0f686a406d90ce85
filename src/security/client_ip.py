"""The client's IP: the direct peer, or X-Forwarded-For when the peer is a trusted proxy."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from starlette.types import Scope

Network = IPv4Network | IPv6Network


def parse_networks(values: list[str]) -> list[Network]:
    return [ip_network(value, strict=False) for value in values]


def _trusted(address: str, trusted: list[Network]) -> bool:
    try:
        parsed: IPv4Address | IPv6Address = ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in trusted)


def client_ip(scope: Scope, trusted: list[Network]) -> str | None:
    """Walk X-Forwarded-For from the right past trusted proxies; the first other hop is the client."""
    client = scope.get("client")
    peer: str | None = client[0] if client else None
    if peer is None or not trusted or not _trusted(peer, trusted):
        return peer
    forwarded = [
        value.decode("latin-1") for name, value in scope.get("headers", []) if name == b"x-forwarded-for"
    ]
    hops = [hop.strip() for header in forwarded for hop in header.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            try:
                return str(ip_address(hop))
            except ValueError:
                return peer
    return hops[0] if hops else peer
