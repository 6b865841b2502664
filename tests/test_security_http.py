"""common/security.py for an aiohttp front (the OpenAI HTTP front's wiring): the API key middleware's
OpenAI-style 401s and the TLS context, on a small real aiohttp app over HTTPS on loopback."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator

import pytest

from common.config import SecurityConfig, TlsConfig
from common.security import KEY_NEEDED_MESSAGE, FrontSecurity
from tests.router_harness import async_test, free_port
from tests.security_keys import GOOD_KEY, OTHER_KEY, WRONG_KEY, TlsFilesForTest, make_tls, write_api_keys

aiohttp = pytest.importorskip("aiohttp", reason="aiohttp is not installed (requirements.txt pins it)")
from aiohttp import web  # noqa: E402 (after the skip)


@contextlib.asynccontextmanager
async def https_app(security: FrontSecurity) -> AsyncIterator[str]:
    """The app the HTTP front would build, wired the way it should be; yields its base URL."""

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text="<html></html>", content_type="text/html")

    app = web.Application(middlewares=security.http_middlewares(open_prefixes=("/static/",)))
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/static/index.html", page)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=security.ssl_context()).start()
    try:
        yield f"https://localhost:{port}"
    finally:
        await runner.cleanup()


def client_context(files: TlsFilesForTest, with_certificate: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(files.ca_cert))
    if with_certificate:
        context.load_cert_chain(str(files.client_cert), str(files.client_key))
    return context


def front(
    tmp_path, *, mutual: bool = False, open_health: bool = True
) -> tuple[FrontSecurity, TlsFilesForTest]:
    files = make_tls(tmp_path)
    tls = TlsConfig(
        cert_file=str(files.server_cert),
        key_file=str(files.server_key),
        client_ca_file=str(files.ca_cert) if mutual else None,
    )
    keys = write_api_keys(tmp_path / "keys", GOOD_KEY)
    config = SecurityConfig(tls=tls, api_keys_file=str(keys), open_health=open_health)
    return FrontSecurity.load(config), files


def expected_error(kind: str) -> dict:
    return {"error": {"message": KEY_NEEDED_MESSAGE, "type": kind, "param": None, "code": "invalid_api_key"}}


@async_test
async def test_openai_style_401_for_a_missing_or_wrong_key_and_health_open(tmp_path):
    security, files = front(tmp_path)
    async with https_app(security) as url, aiohttp.ClientSession() as session:
        tls = client_context(files)
        async with session.get(f"{url}/v1/models", ssl=tls) as missing:
            assert missing.status == 401
            assert await missing.json() == expected_error("invalid_request_error")
            assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        for header in (f"Bearer {WRONG_KEY}", f"Basic {GOOD_KEY}"):
            async with session.get(f"{url}/v1/models", ssl=tls, headers={"Authorization": header}) as wrong:
                assert wrong.status == 401
                body = await wrong.json()
                expected = "invalid_request_error" if header.startswith("Basic") else "authentication_error"
                assert body == expected_error(expected)
        async with session.get(
            f"{url}/v1/models", ssl=tls, headers={"Authorization": f"Bearer {GOOD_KEY}"}
        ) as ok:
            assert ok.status == 200 and (await ok.json())["object"] == "list"
        async with session.get(f"{url}/health", ssl=tls) as health:
            assert health.status == 200
        async with session.get(f"{url}/static/index.html", ssl=tls) as page:
            assert page.status == 200  # the page's files are open: its script then sends the key
        async with session.options(f"{url}/v1/models", ssl=tls) as preflight:
            assert preflight.status != 401  # a CORS preflight carries no credentials
        async with session.get(f"{url}/static", ssl=tls) as outside:
            assert outside.status == 401  # the prefix opens what is under it, nothing beside it


@async_test
async def test_health_needs_the_key_when_not_open_and_reload_rotates_keys(tmp_path):
    security, files = front(tmp_path, open_health=False)
    async with https_app(security) as url, aiohttp.ClientSession() as session:
        tls = client_context(files)
        async with session.get(f"{url}/health", ssl=tls) as health:
            assert health.status == 401
        write_api_keys(tmp_path / "keys", OTHER_KEY)
        security.reload()
        for key, status in ((OTHER_KEY, 200), (GOOD_KEY, 401)):
            async with session.get(
                f"{url}/health", ssl=tls, headers={"Authorization": f"Bearer {key}"}
            ) as reply:
                assert reply.status == status


@async_test
async def test_the_ssl_context_serves_tls_1_2_plus_and_mutual_tls_refuses_a_client_without_a_certificate(
    tmp_path,
):
    security, files = front(tmp_path, mutual=True)
    assert security.ssl_context().minimum_version >= ssl.TLSVersion.TLSv1_2
    headers = {"Authorization": f"Bearer {GOOD_KEY}"}
    async with https_app(security) as url, aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"{url}/v1/models", ssl=client_context(files), headers=headers) as reply:
                await reply.read()
        async with session.get(
            f"{url}/v1/models", ssl=client_context(files, with_certificate=True), headers=headers
        ) as reply:
            assert reply.status == 200


def test_without_tls_or_keys_the_front_is_plain_and_open():
    security = FrontSecurity.load(SecurityConfig())
    assert security.ssl_context() is None
    assert security.http_middlewares() == [] and security.grpc_interceptors() == []
