"""The HTTP front's page (GET /) in a real headless Chromium against a real paced pool: the pool panel
shows the workers, a message streams its answer in, Stop cancels it on the worker; against a pool
with API keys, the page asks for the key and sends it.

Skips with the reason where Debian's `chromium` is not installed (`.ci/run` installs it).
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.harness import ProcessSet, start_pool, write_config
from tests.headless_chromium import Page, chromium_binary, chromium_page
from tests.security_keys import GOOD_KEY, WRONG_KEY, write_api_keys

TOKENS = 400  # at 20 tokens/s: an answer that streams until Stop is pressed (context 512)


def test_the_page_chats_streams_stops_and_shows_the_pool(tmp_path: Path, procs: ProcessSet) -> None:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    config = write_config(
        tmp_path,
        {
            "model": {
                "name": "paced-page",
                "defaults": {"max_new_tokens": TOKENS},
                "paced": {"tokens_per_second": 20.0, "tokens_per_request": TOKENS, "echo": True},
            }
        },
    )
    pool = start_pool(procs, config)
    url = f"http://{config.raw['http']['listen']}/"
    asyncio.run(_drive(binary, tmp_path, url))
    pool.supervisor.wait_for_log(r"request \S+: done, cancelled; prompt \d+ tokens")
    pool.supervisor.wait_for_log(r"request \S+: http /v1/chat/completions CANCELLED")


async def _drive(binary: str, tmp_path: Path, url: str) -> None:
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    async with chromium_page(binary, profile) as page:
        await page.open(url)
        await page.wait_for("document.getElementById('model').textContent === 'paced-page'", "the model name")
        workers = await page.wait_for(
            "[...document.querySelectorAll('#devices .worker.state-idle')].map(w => w.textContent)"
            ".filter(t => t.endsWith(': idle')).length === 2 && "
            "[...document.querySelectorAll('#devices strong')].map(d => d.textContent).join(',')",
            "the pool panel to list both workers idle",
        )
        assert workers == "device 0,device 1"

        await page.evaluate(
            "document.getElementById('temperature').value = '0';"
            f"document.getElementById('max_tokens').value = '{TOKENS}';"
            "document.getElementById('prompt').value = 'streamed words';"
            "document.getElementById('send').click()"
        )
        await page.wait_for(
            "document.querySelector('.turn.user').textContent === 'streamed words'", "the question"
        )
        answer = "document.querySelector('.turn.assistant').textContent"
        await page.wait_for(f"{answer}.startsWith('streamed words streamed')", "streamed text to appear")
        await page.wait_for(
            "document.querySelectorAll('#devices .worker.state-busy').length === 1", "a busy worker"
        )
        await page.screenshot(tmp_path / "page-streaming.png")

        await page.evaluate("document.getElementById('stop').click()")
        await page.wait_for("document.getElementById('status').textContent === 'stopped'", "the stop")
        stopped_at = await page.evaluate(answer)
        await page.wait_for(
            "document.querySelectorAll('#devices .worker.state-idle').length === 2", "both workers idle again"
        )
        assert await page.evaluate(answer) == stopped_at  # nothing arrives after Stop
        assert len(stopped_at.split()) < TOKENS
        assert await page.evaluate("document.getElementById('send').disabled") is False


def test_the_page_of_a_keyed_pool_asks_for_the_key_and_sends_it(tmp_path: Path, procs: ProcessSet) -> None:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    keys = write_api_keys(tmp_path / "keys", GOOD_KEY)
    config = write_config(
        tmp_path,
        {
            "model": {"name": "paced-keyed", "paced": {"tokens_per_request": 6, "echo": True}},
            "security": {"api_keys_file": str(keys)},
        },
    )
    pool = start_pool(procs, config)
    url = f"http://{config.raw['http']['listen']}/"
    # What is open without a key (README "Security"): health, the page and its script; not the rest.
    assert [_status(url + path) for path in ("health", "", "static/page.js")] == [200, 200, 200]
    assert [_status(url + path) for path in ("pool/status", "metrics", "v1/models")] == [401, 401, 401]
    assert _status(url + "metrics", GOOD_KEY) == 200
    asyncio.run(_drive_keyed(binary, tmp_path, url))
    log = pool.supervisor.log()
    assert "refused a call to GET /pool/status" in log  # the first refusal (they are rate-limited)
    assert GOOD_KEY not in log and WRONG_KEY not in log


def _status(url: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


KEY_NEEDED = "this pool needs an API key: enter it in the API key field"
PANEL = "document.getElementById('devices').textContent"
ANSWER = "document.querySelector('.turn.assistant:last-child, .turn.error:last-child').textContent"


async def _type_key(page: Page, key: str) -> None:
    await page.evaluate(
        f"{{ const field = document.getElementById('api_key'); field.value = '{key}';"
        "field.dispatchEvent(new Event('change')); }"
    )


async def _ask(page: Page, prompt: str) -> None:
    await page.evaluate(
        f"document.getElementById('prompt').value = '{prompt}'; document.getElementById('send').click()"
    )
    status = "document.getElementById('status').textContent"
    await page.wait_for(f"{status}.startsWith('done') || {status} === 'error'", f"the answer to {prompt}")


async def _drive_keyed(binary: str, tmp_path: Path, url: str) -> None:
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    async with chromium_page(binary, profile) as page:
        await page.open(url)  # the page's files are open: they hold nothing
        await page.wait_for(f"{PANEL} === '{KEY_NEEDED}'", "the panel to ask for the key")
        await _ask(page, "no key")
        assert await page.evaluate(ANSWER) == f"401: {KEY_NEEDED}"

        await _type_key(page, WRONG_KEY)
        await _ask(page, "wrong key")
        assert await page.evaluate(ANSWER) == f"401: {KEY_NEEDED}"
        assert await page.evaluate(PANEL) == KEY_NEEDED

        await _type_key(page, GOOD_KEY)
        await page.wait_for(
            "document.querySelectorAll('#devices .worker.state-idle').length === 2", "the panel with the key"
        )
        assert await page.evaluate("document.getElementById('model').textContent") == "paced-keyed"
        await _ask(page, "right key")
        assert (await page.evaluate(ANSWER)).startswith("right key right key")
        await page.screenshot(tmp_path / "page-keyed.png")

        # The key lives in this tab's sessionStorage only: a reload keeps it, nothing else holds it.
        await page.open(url)
        assert await page.evaluate("document.getElementById('api_key').value") == GOOD_KEY
        await page.wait_for(
            "document.querySelectorAll('#devices .worker').length === 2", "the panel after reload"
        )
        assert await page.evaluate("localStorage.length + document.cookie.length") == 0
