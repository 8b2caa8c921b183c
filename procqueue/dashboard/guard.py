"""Who may use a dashboard: the checks every request passes before it reaches the page.

A dashboard can retry and cancel a store's tasks, and its page shows their inputs and
errors, so it is guarded as Jupyter guards a notebook server:

- a random token, given in the URL the dashboard prints; every request must carry it (query
  parameter ``token`` or header ``X-Procqueue-Token``), the event stream included;
- the Host header must name this server by an IP address, ``localhost``, this machine's name
  or the ``--host`` given: a DNS-rebinding page (evil.example resolving to 127.0.0.1) sends
  its own name, and is refused.  Any port: what rebinding needs is a name, and an SSH tunnel
  or a proxy may well reach the server on another port;
- a POST (an action) must also come from the page itself: its Origin header must be this
  server's, so a page on another site cannot submit a form here, token or not.

Pure functions of the request's headers: the server applies them, tests call them directly.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
import urllib.parse

TOKEN_BYTES = 24  # 192 bits, as secrets recommends for tokens that guard something
TOKEN_HEADER = "X-Procqueue-Token"


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


class Guard:
    def __init__(self, token: str, bound_host: str) -> None:
        self.token = token
        # names (not addresses) this server answers to; addresses are checked as such
        self._names = {"localhost", socket.gethostname().lower(), bound_host.lower()}

    def token_ok(self, given: str | None) -> bool:
        # compare_digest: the time taken does not tell how much of a guess was right
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def host_ok(self, host_header: str | None) -> bool:
        """Whether the Host header names this server: any IP address, or a name it knows."""
        if not host_header:
            return False
        name = _host_name(host_header)
        return name is not None and (_is_ip_address(name) or name.lower() in self._names)

    def origin_ok(self, origin: str | None, host_header: str) -> bool:
        """Whether a POST comes from a page of this server: its Origin is http://<Host>.
        Browsers send Origin with every POST; a request without one is refused too (a
        script that has the token can send the header)."""
        if not origin:
            return False
        return origin.lower() == f"http://{host_header}".lower()


def _host_name(value: str) -> str | None:
    """"127.0.0.1" from "127.0.0.1:8765", "::1" from "[::1]:80"; None if malformed."""
    try:
        parts = urllib.parse.urlsplit(f"http://{value}")
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        return None
    if parts.hostname is None or parts.username is not None or parts.path or parts.query \
            or parts.fragment:
        return None
    return parts.hostname


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
