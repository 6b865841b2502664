"""The HTTP front's page (GET /) in a real headless Chromium against a real paced pool: the pool panel
shows the workers, a message streams its answer in, Stop cancels it on the worker.

Skips with the reason where Debian's `chromium` is not installed (`.ci/run` installs it).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.harness import ProcessSet, start_pool, write_config
from tests.headless_chromium import chromium_binary, chromium_page

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
