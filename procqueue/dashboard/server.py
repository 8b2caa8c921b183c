"""The dashboard's HTTP server: the standard library's, one thread per request.

    GET  /              the page (one HTML document, its style and script inline)
    GET  /events        server-sent events: one JSON snapshot per interval (broadcast.py)
    GET  /api/tasks     a page of the task table: ?status=&queue=&q=&before=&limit=
    GET  /api/task      one task in full: ?id=
    POST /api/retry     {"ids": [...]}: put failed or cancelled tasks back
    POST /api/cancel    {"ids": [...]}: cancel pending or running tasks

Every request passes guard.py's checks first (Host, then the token; for a POST the Origin
too) and is refused with 403 otherwise.  A page is a few requests and one long-lived event
stream, which is what a thread per request serves well; no framework is needed for that.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import secrets
import socket
import sys
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, TypeVar, cast

from .broadcast import Broadcaster
from .guard import TOKEN_HEADER, Guard, new_token
from .page import render_page

KEEPALIVE_S = 15.0  # a comment line this often keeps proxies and browsers from timing out
RECONNECT_MS = 2000  # a page whose stream broke reconnects after this long
MAX_BODY_BYTES = 64 * 1024
SHUTDOWN_POLL_S = 0.2
SOCKET_TIMEOUT_S = 60.0

S = TypeVar("S", bound="DashboardServer")
_REQUESTS = itertools.count(1)


class Source(Protocol):
    """What a dashboard shows (store_view.StoreView, pool_view.PoolView)."""

    kind: str
    title: str

    def snapshot(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class DashboardServer:
    """A live page about a source, served on ``host``:``port`` (0: a free port) until
    close().  ``url`` carries the token every request needs."""

    def __init__(self, source: Source, *, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, refresh_s: float = 1.0) -> None:
        self.source = source
        self.host = host
        self.token = token or new_token()
        self.broadcaster = Broadcaster(source.snapshot, refresh_s)
        self._server = _Server((host, port), _Handler, self)  # binds now: the port is known
        self.port = int(self._server.server_address[1])
        self.guard = Guard(self.token, host)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}/?token={self.token}"

    def start(self: S) -> S:
        """Serve on a thread of this process; returns at once."""
        self.broadcaster.start()
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        args=(SHUTDOWN_POLL_S,),
                                        name="procqueue-dashboard-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving: open event streams end, the port is released, the source closed."""
        self.broadcaster.close()  # ends the event streams' loops
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
        self.source.close()

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # an event stream left open never holds up the process's exit

    def __init__(self, address: tuple[str, int], handler: Any,
                 dashboard: DashboardServer) -> None:
        self.address_family = _family(address[0])
        self.dashboard = dashboard
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a page closed mid-answer is no error worth a traceback on the terminal
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server_version = "procqueue-dashboard"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_S  # a connection that sends nothing does not hold a thread forever

    @property
    def dashboard(self) -> DashboardServer:
        return cast(_Server, self.server).dashboard

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the terminal belongs to the command that serves the page."""

    def handle(self) -> None:
        # named, so that a profile (or bench/dashboard_overhead.py) can tell what it costs
        threading.current_thread().name = f"procqueue-dashboard-request-{next(_REQUESTS)}"
        super().handle()

    # ---- checks -----------------------------------------------------------------------------

    def _allowed(self, query: dict[str, str]) -> bool:
        guard = self.dashboard.guard
        host = self.headers.get("Host")
        if not guard.host_ok(host):
            self._refuse("unknown Host header (this server answers to its address only)")
            return False
        if not guard.token_ok(self.headers.get(TOKEN_HEADER) or query.get("token")):
            self._refuse("a token is needed: open the URL the dashboard printed")
            return False
        if self.command == "POST" and not guard.origin_ok(self.headers.get("Origin"),
                                                           host or ""):
            self._refuse("cross-origin request refused")
            return False
        return True

    def _refuse(self, why: str) -> None:
        self._send(HTTPStatus.FORBIDDEN, why.encode(), "text/plain; charset=utf-8")

    # ---- routes -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        path, query = self._parse()
        if not self._allowed(query):
            return
        try:
            self._get(path, query)
        except Exception as exc:  # the store is busy or gone: the page says so, and goes on
            self._unavailable(exc)

    def do_POST(self) -> None:
        path, query = self._parse()
        if not self._allowed(query):
            return
        try:
            self._post(path)
        except Exception as exc:
            self._unavailable(exc)

    def _unavailable(self, exc: Exception) -> None:
        self._json({"error": f"{type(exc).__name__}: {exc}"}, HTTPStatus.SERVICE_UNAVAILABLE)

    def _get(self, path: str, query: dict[str, str]) -> None:
        if path == "/":
            nonce = secrets.token_urlsafe(16)
            page = render_page(self.dashboard.source.kind, self.dashboard.source.title, nonce)
            self._send(HTTPStatus.OK, page, "text/html; charset=utf-8", nonce)
        elif path == "/events":
            self._stream_events()
        elif path == "/api/tasks" and hasattr(self.dashboard.source, "tasks"):
            self._tasks(query)
        elif path == "/api/task" and hasattr(self.dashboard.source, "task"):
            self._task(query)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain; charset=utf-8")

    def _post(self, path: str) -> None:
        action = path.removeprefix("/api/")
        if action not in ("retry", "cancel") or not hasattr(self.dashboard.source, "act"):
            self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain; charset=utf-8")
            return
        try:
            ids = _ids_of(self._body())
            source: Any = self.dashboard.source  # one that has act(): checked above
            changed = source.act(action, ids)
        except ValueError as exc:
            self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
            return
        self._json({"changed": changed})

    def _tasks(self, query: dict[str, str]) -> None:
        source: Any = self.dashboard.source
        try:
            page = source.tasks(query.get("status"), query.get("queue"), query.get("q"),
                                _int_or_none(query.get("before")),
                                _int_or_none(query.get("limit")) or 50)
        except ValueError as exc:
            self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
            return
        self._json(page)

    def _task(self, query: dict[str, str]) -> None:
        source: Any = self.dashboard.source
        try:
            task_id = int(query.get("id", ""))
        except ValueError:
            self._json({"error": "id must be a task id"}, HTTPStatus.BAD_REQUEST)
            return
        detail = source.task(task_id)
        if detail is None:
            self._json({"error": f"no task {task_id}"}, HTTPStatus.NOT_FOUND)
        else:
            self._json(detail)

    def _stream_events(self) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        broadcaster = self.dashboard.broadcaster
        try:
            with broadcaster.listening() as seq:
                self.wfile.write(f"retry: {RECONNECT_MS}\n\n".encode())
                while not broadcaster.closed:
                    got = broadcaster.next_after(seq, KEEPALIVE_S)
                    if got is None:
                        self.wfile.write(b": keepalive\n\n")
                        continue
                    seq, data = got
                    self.wfile.write(b"data: " + data + b"\n\n")
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass  # the page was closed

    # ---- plumbing ---------------------------------------------------------------------------

    def _parse(self) -> tuple[str, dict[str, str]]:
        parts = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parts.query).items()}
        return parts.path, query

    def _body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ValueError("bad Content-Length") from None
        if not 0 < length <= MAX_BODY_BYTES:
            raise ValueError(f"a body of 1 to {MAX_BODY_BYTES} bytes is needed")
        try:
            return json.loads(self.rfile.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("the body is not JSON") from None

    def _json(self, value: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        body = json.dumps(value, separators=(",", ":"), default=str).encode()
        self._send(status, body, "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str,
              nonce: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")  # the URL holds the token
        self.send_header("X-Frame-Options", "DENY")  # no framing: no clickjacked buttons
        if nonce is not None:
            # only this page's own inline style and script run; it talks only to this server
            self.send_header("Content-Security-Policy",
                             f"default-src 'none'; script-src 'nonce-{nonce}'; "
                             f"style-src 'nonce-{nonce}'; connect-src 'self'; img-src data:; "
                             f"frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
        self.end_headers()
        self.wfile.write(body)


def _ids_of(body: Any) -> list[int]:
    ids = body.get("ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                            for i in ids):
        raise ValueError('the body must be {"ids": [task ids]}')
    return ids


def _int_or_none(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET  # a name: resolved as IPv4


def _url_host(host: str) -> str:
    """How the printed URL names the server: a wildcard address is reached on loopback."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
