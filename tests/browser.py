"""A headless Chromium driven through the DevTools protocol, for tests that check a page really renders.

No browser-automation package is needed: Chromium's ``--remote-debugging-port`` speaks JSON over a
WebSocket, and the few frames a test needs are written here (RFC 6455: masked client frames, fragmented
server messages, ping/pong). :func:`find_chromium` locates Debian's ``chromium``; :func:`inspect_page`
loads a file, collects console messages, uncaught exceptions and failed loads, evaluates expressions and
can save a full-page screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The path of a Chromium/Chrome executable, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class _WebSocket:
    """The client side of one WebSocket connection (text frames only)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        match = re.match(r"ws://([^/:]+):(\d+)(/.*)", url)
        if match is None:
            raise ValueError(f"not a ws:// URL: {url}")
        host, port, path = match.group(1), int(match.group(2)), match.group(3)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode("ascii"))
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the browser closed the connection during the handshake")
            response += chunk
        head, self.buffer = response.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"WebSocket handshake refused: {head[:200]!r}")

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the browser closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode("utf-8"))

    def receive(self) -> str:
        message = b""
        while True:
            first, second = self._read(2)
            opcode, n = first & 0x0F, second & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if second & 0x80 else b""
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("the browser closed the WebSocket")
            message += payload
            if first & 0x80:  # the final fragment
                return message.decode("utf-8")

    def close(self) -> None:
        self.sock.close()


@dataclass
class PageReport:
    """What loading a page showed.

    Attributes:
        console: Console messages as ``(type, text)`` (``log``, ``warning``, ``error``, ...).
        exceptions: Uncaught exceptions' descriptions.
        log_errors: Browser log entries of level error (failed loads among them).
        values: The results of the expressions evaluated after the load, by expression.
    """

    console: list[tuple[str, str]] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[str]:
        """Every problem: console errors and warnings, exceptions, error log entries."""
        return (
            [
                f"console.{kind}: {text}"
                for kind, text in self.console
                if kind in ("error", "warning", "assert")
            ]
            + [f"exception: {text}" for text in self.exceptions]
            + [f"log: {text}" for text in self.log_errors]
        )


class _Session:
    def __init__(self, ws: _WebSocket, report: PageReport) -> None:
        self.ws = ws
        self.report = report
        self.next_id = 0

    def _record(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.report.console.append((params.get("type", "log"), text))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.report.exceptions.append(
                str(details.get("exception", {}).get("description") or details.get("text"))
            )
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.report.log_errors.append(f"{entry.get('text')} ({entry.get('url', '')})")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.receive())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            self._record(message)

    def wait_for(self, event: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self.ws.receive())
            self._record(message)
            if message.get("method") == event:
                return
        raise TimeoutError(f"no {event} within {timeout} s")


def inspect_page(
    path: str | os.PathLike[str],
    expressions: tuple[str, ...] = (),
    screenshot: str | os.PathLike[str] | None = None,
    width: int = 1200,
    timeout: float = 60.0,
    mobile: bool = False,
) -> PageReport:
    """Loads ``path`` (a local file) in headless Chromium with the network off and reports what happened.

    Args:
        path: The HTML file.
        expressions: JavaScript expressions evaluated after the load event (results by value).
        screenshot: Where to save a full-page PNG screenshot (None: none).
        width: Viewport width in CSS pixels.
        mobile: Emulate a phone's screen (``width`` wide, any width: a headless window is at least 500 px).
        timeout: Seconds to wait for the browser and the page.

    Raises:
        FileNotFoundError: when no Chromium is installed.
    """
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("no chromium executable found")
    report = PageReport()
    # Chromium's helpers (zygote, crashpad) may still write into the profile for a moment after the browser
    # exits: the whole process group is stopped, and a file they leave behind does not fail the check
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                f"--user-data-dir={profile}",
                "--proxy-server=127.0.0.1:9",  # no network: a page must not need one
                f"--window-size={width},900",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + timeout
            while not port_file.is_file() or not port_file.read_text().strip():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not start (exit status {process.poll()})")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as response:
                targets = json.loads(response.read())
            page = next(t for t in targets if t.get("type") == "page")
            ws = _WebSocket(page["webSocketDebuggerUrl"], timeout=timeout)
            try:
                session = _Session(ws, report)
                for domain in ("Page", "Runtime", "Log"):
                    session.call(f"{domain}.enable")
                if mobile:
                    session.call(
                        "Emulation.setDeviceMetricsOverride",
                        width=width,
                        height=844,
                        deviceScaleFactor=1,
                        mobile=True,
                    )
                session.call("Page.navigate", url=Path(path).resolve().as_uri())
                session.wait_for("Page.loadEventFired", timeout)
                for expression in expressions:
                    result = session.call("Runtime.evaluate", expression=expression, returnByValue=True)
                    report.values[expression] = result.get("result", {}).get("value")
                if screenshot is not None:
                    height = session.call(
                        "Runtime.evaluate",
                        expression="document.documentElement.scrollHeight",
                        returnByValue=True,
                    )["result"]["value"]
                    session.call(
                        "Emulation.setDeviceMetricsOverride",
                        width=width,
                        height=int(height),
                        deviceScaleFactor=1,
                        mobile=mobile,
                    )
                    shot = session.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
                    Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
                session.call("Runtime.evaluate", expression="0")  # drain late console events
            finally:
                ws.close()
        finally:
            _stop_group(process)
    return report


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stops the browser and every helper process it started (its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # helpers that outlived the browser
    process.wait()
