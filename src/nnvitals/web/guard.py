"""Who may talk to the page: requests for this server by its own name, and writes from its own pages.

DNS rebinding: a web page on attacker.example can make its domain resolve to 127.0.0.1 and then read and
write the local server as if it were its own origin; the browser still sends `Host: attacker.example`.
So every request must name this server in Host: `localhost`, an IP address (a rebinding needs a domain
name), or, when listening beyond loopback, this machine's own name; and the port must be ours.

Cross-site requests: a page elsewhere can make the browser POST here (a form, fetch with no-cors). So a
request that changes state (starts a lab run, records a grade) must come from one of our own pages:
its Origin, when the browser sends one, must be this server, and its Sec-Fetch-Site must not say
cross-site. Programs that send neither (curl, scripts) are not browsers and cannot be driven by a page.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `name` spells ('[::1]' too), None for a host name."""
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    address = _ip(host)
    return host == "localhost" or (address is not None and address.is_loopback)


def _split(authority: str, default_port: int) -> tuple[str, int] | None:
    """'host:port' (or '[v6]:port', or a bare host) -> (lower-case host, port); None if malformed."""
    parts = urlsplit("//" + authority)
    try:
        port = parts.port
    except ValueError:
        return None
    if parts.hostname is None or parts.username is not None or parts.password is not None:
        return None
    return parts.hostname.lower(), port if port is not None else default_port


class Guard:
    """The Host and Origin rules for a server listening on `host`:`port`."""

    def __init__(self, host: str, port: int):
        self.port = port
        names = {"localhost"}
        if _ip(host) is None:
            names.add(host.lower())
        if not is_loopback(host):  # reachable by the machine's own name too
            names.update({socket.gethostname().lower(), socket.getfqdn().lower()})
        self.names = frozenset(names)

    def host_problem(self, host_header: str | None) -> str | None:
        """Why a request with this Host header is refused, or None when it is ours."""
        if not host_header:
            return "the request names no Host"
        where = _split(host_header, 80)
        if where is None:
            return f"the Host {host_header!r} is malformed"
        name, port = where
        if port != self.port or not (name in self.names or _ip(name) is not None):
            return (f"the Host {host_header!r} is not this server (DNS rebinding protection); open the page as "
                    f"http://127.0.0.1:{self.port}/ or http://localhost:{self.port}/")
        return None

    def origin_problem(self, method: str, host_header: str | None, origin: str | None,
                       fetch_site: str | None) -> str | None:
        """Why a state-changing request is refused as cross-site, or None when it may go ahead."""
        if method.upper() in SAFE_METHODS:
            return None
        if origin is not None:
            parts = urlsplit(origin)
            if parts.scheme != "http" or not parts.netloc:
                return f"requests that change state must come from this server's pages, not from {origin!r}"
            if _split(parts.netloc, 80) != _split(host_header or "", 80):
                return f"requests that change state must come from this server's pages, not from {origin!r}"
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            return f"requests that change state must come from this server's pages (Sec-Fetch-Site: {fetch_site})"
        return None
