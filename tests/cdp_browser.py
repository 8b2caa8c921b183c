"""Headless Chromium driven over the DevTools protocol, for tests that use a page as a person
does: open it, wait for what it shows, click.

Chromium speaks the protocol on a pipe (--remote-debugging-pipe: it reads commands on fd 3
and writes replies on fd 4, each a JSON message ended by a NUL byte), so no WebSocket client
and no port are needed.  A tiny Python launcher puts our pipe ends on fds 3 and 4 and execs
the browser.  close() asks the browser to quit and kills its process group if it does not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--mute-audio"]
_LAUNCHER = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
             "os.execv(sys.argv[3], sys.argv[3:])")


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, profile_dir: str, window: tuple[int, int] = (1280, 1000),
                 timeout_s: float = 30.0) -> None:
        if CHROMIUM is None:
            raise BrowserError("chromium is not installed (.ci/install-browser)")
        self.timeout_s = timeout_s
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(to_browser_r), str(from_browser_w), CHROMIUM,
             *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile_dir}",
             f"--window-size={window[0]},{window[1]}", "about:blank"],
            pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._lock = threading.Lock()
        self._replies: dict[int, dict[str, Any]] = {}
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    # ---- the protocol -----------------------------------------------------------------------

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._arrived:
                    self._replies[-1] = {"error": {"message": "the browser exited"}}
                    self._arrived.notify_all()
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:  # a reply; events are not needed here
                    with self._arrived:
                        self._replies[message["id"]] = message
                        self._arrived.notify_all()

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        with self._lock:
            self._next_id += 1
            call_id = self._next_id
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        with self._arrived:
            while call_id not in self._replies and -1 not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrowserError(f"{method}: no reply in {timeout_s or self.timeout_s} s")
                self._arrived.wait(left)
            reply = self._replies.pop(call_id, None) or self._replies[-1]
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return dict(reply.get("result", {}))

    # ---- pages ------------------------------------------------------------------------------

    def open(self, url: str) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target,
                                                      "flatten": True})["sessionId"]
        page = Page(self, session)
        page.send("Page.enable")
        page.send("Page.navigate", {"url": url})
        page.wait_for("document.readyState === 'complete'")
        return page

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout_s=10)
        except BrowserError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        finally:
            # the renderer and other helpers share the browser's session: none may outlive it
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(self._to_browser)
            self._reader.join(timeout=5)
            os.close(self._from_browser)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.send(method, params, self.session)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if a promise)."""
        reply = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                               "awaitPromise": True})
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression!r} raised {text}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 30.0, every_s: float = 0.1) -> Any:
        """The first truthy value of ``expression``, evaluated every ``every_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value = self.evaluate(expression)
            except BrowserError as exc:
                # The page navigated while it was asked (what some waits wait for): ask the
                # new page at the next turn.
                if "navigated or closed" not in str(exc) and "context" not in str(exc):
                    raise
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} was still {value!r} after {timeout_s} s")
            time.sleep(every_s)

    def text(self, selector: str) -> str | None:
        return self.evaluate(f"document.querySelector({json.dumps(selector)})?.textContent "
                             f"?? null")

    def click(self, selector: str) -> None:
        """Click the element as a mouse does: scrolled into view, pressed and released at
        its centre (so it must be visible and not covered)."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            f" if (!e) return null; e.scrollIntoView({{block: 'center'}});"
            f" const r = e.getBoundingClientRect();"
            f" return [r.left + r.width / 2, r.top + r.height / 2]; }})()")
        if box is None:
            raise BrowserError(f"nothing matches {selector!r}")
        x, y = box
        hit = self.evaluate(f"document.elementFromPoint({x}, {y})?.closest("
                            f"{json.dumps(selector)}) !== null")
        if not hit:
            raise BrowserError(f"{selector!r} is covered by another element")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y,
                                                   "button": "left", "clickCount": 1})

    def hover(self, x: float, y: float) -> None:
        """Move the mouse to (x, y) of the viewport, as a person pointing at something."""
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def screenshot(self, path: str, full_page: bool = True,
                   max_height: float | None = None) -> None:
        """A PNG of the viewport, or of the whole page (down to ``max_height`` CSS pixels)."""
        import base64
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            height = min(size["height"], max_height or size["height"])
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": height,
                              "scale": 1}
        data = self.send("Page.captureScreenshot", params)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
