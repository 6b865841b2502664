"""Debian's headless Chromium driven over the DevTools protocol (a websocket, via aiohttp), for tests
of the HTTP front's page: load it, evaluate JavaScript in it, wait for what it shows.

The DevTools protocol needs no driver binary matching the browser's version, and no client
package beyond aiohttp, which the router already uses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

WAIT_S = 30.0  # generous: a loaded 2-core machine starts a browser slowly


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One browser tab: calls DevTools methods and evaluates JavaScript in the page."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._socket = socket
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        await self._socket.send_json({"id": message_id, "method": method, "params": params})
        while True:  # events arrive in between; the tests poll the page instead of following them
            reply = json.loads((await self._socket.receive(timeout=WAIT_S)).data)
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str) -> Any:
        """The value of `expression` once it is truthy; fails naming `what` after WAIT_S."""
        deadline = time.monotonic() + WAIT_S
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what} ({expression})")
            await asyncio.sleep(0.1)

    async def open(self, url: str) -> None:
        await self.call("Page.enable")
        await self.call("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'", f"{url} to load")

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


@contextlib.asynccontextmanager
async def chromium_page(binary: str, profile: Path) -> AsyncIterator[Page]:
    """A headless Chromium with one blank tab; the browser is killed on exit."""
    browser = subprocess.Popen(
        [
            binary,
            "--headless=new",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1200,800",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(profile.parent / "chromium.log").open("wb"),
    )
    try:
        port = await _devtools_port(profile / "DevToolsActivePort", browser)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as listing:
                targets = await listing.json()
            page_url = next(target["webSocketDebuggerUrl"] for target in targets if target["type"] == "page")
            async with session.ws_connect(page_url, max_msg_size=64 << 20) as socket:
                yield Page(socket)
    finally:
        browser.kill()
        browser.wait()


async def _devtools_port(port_file: Path, browser: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + WAIT_S
    while not port_file.exists() or not port_file.read_text().strip():
        if browser.poll() is not None:
            raise AssertionError(f"chromium exited with {browser.returncode} before listening for DevTools")
        if time.monotonic() > deadline:
            raise AssertionError("chromium did not open its DevTools port")
        await asyncio.sleep(0.1)
    return int(port_file.read_text().split()[0])
