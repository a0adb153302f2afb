"""Addresses: the hosts a target names, whether a host is this machine, and where an API key may travel.

An API key sent without TLS can be read by anyone on the path, so both ends refuse it unless every host
involved is loopback (or the user allows it explicitly): the server for the address it binds, the client
for the target it calls. The client's check runs when the client is built, before any connection.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOCAL_SCHEMES = ("unix:", "unix-abstract:")  # gRPC targets that never leave the machine
MAX_REPLY_BYTES = 64 * 1024 * 1024  # the largest gRPC reply a server sends and a client takes (vectors are big)


class InsecureKeyError(ValueError):
    """An API key would travel in clear text beyond this machine."""


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback IP addresses (127.0.0.0/8, ::1), with or without [brackets]."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(address: str) -> str:
    """"HOST:PORT", "[V6]:PORT", "HOST" or a bare IPv6 address -> HOST."""
    address = address.strip()
    if address.startswith("["):
        return address[1:].partition("]")[0]
    if address.count(":") > 1:  # a bare IPv6 address
        return address
    return address.partition(":")[0]


def target_hosts(target: str) -> list[str]:
    """Hosts named by a client target: "HOST:PORT", "HOST:PORT,HOST:PORT", a gRPC URI ("dns:///NAME:PORT",
    "ipv4:A:P,B:P", "ipv6:[A]:P") or an HTTP URL. Unix-socket targets name none (they stay on this machine)."""
    target = target.strip()
    if target.startswith(LOCAL_SCHEMES):
        return []
    if target.startswith(("http://", "https://")):
        return [urlsplit(target).hostname or ""]
    if target.startswith(("ipv4:", "ipv6:")):
        return [_host_of(item) for item in target.partition(":")[2].split(",")]
    if "://" in target:  # dns:///name:port, dns://authority/name:port, other resolvers
        return [_host_of(target.partition("://")[2].rpartition("/")[2])]
    if target.startswith("dns:"):
        return [_host_of(target[len("dns:"):])]
    return [_host_of(item) for item in target.split(",")]


def check_key_transport(target: str, has_key: bool, tls: bool, allow_insecure_key: bool = False) -> None:
    """Raise InsecureKeyError when an API key would go in clear text to a host other than this machine."""
    if not has_key or tls or allow_insecure_key:
        return
    remote = [host for host in target_hosts(target) if not is_loopback(host)]
    if remote:
        raise InsecureKeyError(
            f"refusing to send the API key in clear text to {', '.join(remote)}: connect with TLS "
            "(--tls-root-cert, or an https:// URL), or allow it explicitly (--allow-insecure-key)")
