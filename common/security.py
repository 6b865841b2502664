"""Security in one place for both roles: TLS and API keys on the fronts, CURVE on the worker link.

- TLS: `TlsFiles` reads the PEM files of `security.tls` and gives gRPC server credentials
  (`grpc_server_credentials`, any grpc.aio server) and an `ssl.SSLContext` (`ssl_context`, for
  aiohttp's `web.TCPSite(..., ssl_context=...)`). `reload()` re-reads the files: new handshakes use
  the new certificate, open connections keep theirs.
- API keys: `ApiKeys` reads a file of keys, one a line (several at once, so a key is rotated by
  adding the new one, moving clients, removing the old). Keys are kept as SHA-256 digests and a
  presented key is compared with every one of them in constant time; logs only ever show an 8-hex
  fingerprint. `ApiKeyInterceptor` guards a grpc.aio server; `api_key_middleware` an aiohttp app.
  A refusal says that a key is needed, never why a given key failed.
- CURVE: keypairs in ZeroMQ's certificate format (`zmq.auth`, written by scripts/keygen.py). The
  router's socket is a CURVE server whose handshakes are checked by pyzmq's ThreadAuthenticator
  against `WorkerAllowlist`, a directory of worker public keys re-read on reload. An unknown key
  fails at the handshake: no message of that peer ever reaches the router's code.
- `check_worker_link` refuses a worker link off loopback without CURVE unless the config says the
  network is trusted.

Reload is the process's SIGHUP (router/__main__.py); a reload that cannot read a file keeps what
was loaded before and logs why, so a half-made change never locks everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import ssl
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from common.config import CurveConfig, SecurityConfig, TlsConfig

log = logging.getLogger("security")

# The one message for a missing or wrong key, on every front: it tells what to send, not what failed.
KEY_NEEDED_MESSAGE = "this service needs an API key: send it as 'authorization: Bearer <key>'"
MIN_API_KEY_CHARS = 16  # shorter keys are guessable; scripts/keygen.py makes 43-character ones
FINGERPRINT_HEX_CHARS = 8
REFUSAL_LOG_INTERVAL_S = 10.0  # refusals are logged at most once per interval (plus a count)
GRPC_HEALTH_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")
HTTP_OPEN_PATHS = ("/health",)
_BEARER = "bearer "
_WATCH_JOIN_S = 2.0
_CURVE_DOMAIN = "*"  # the authenticator's default domain: every CURVE socket in the process
# Refusal reasons, for whoever counts them (the router's bm_pool_refused_total)
REFUSED_API_KEY = "api_key"  # a call without a known key
REFUSED_CURVE_KEY = "curve_key"  # a worker connection whose key is not in the allowlist
REFUSED_CURVE_HANDSHAKE = "curve_handshake"  # a worker connection that did not speak CURVE to us
RefusalCounter = Callable[[str], None]


def _uncounted(_reason: str) -> None:
    return None


class SecurityError(ValueError):
    """Key material or a security setting that cannot be used; the message names the file or key."""


def fingerprint(material: bytes | str) -> str:
    """A short, non-reversible name for a key, safe to log."""
    data = material.encode() if isinstance(material, str) else material
    return hashlib.sha256(data).hexdigest()[:FINGERPRINT_HEX_CHARS]


class RateLimitedWarning:
    """Logs the first event at once, then at most one line per interval with the count in between:
    a flood of refused peers cannot fill the disk. Thread-safe (the authenticator has its thread)."""

    def __init__(self, interval_s: float = REFUSAL_LOG_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._last_logged = -float("inf")
        self._suppressed = 0

    def __call__(self, message: str, *args: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last_logged < self._interval_s:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last_logged = self._suppressed, 0, now
        more = f" ({suppressed} more refused since the last report)" if suppressed else ""
        log.warning(message + more, *args)


# ---- addresses


def is_loopback(address: str) -> bool:
    """True for host:port, tcp://host:port or ipc://path on this host only (wildcards are not)."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = address.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", a name or an interface: reachable from elsewhere as far as we know


def warn_if_plaintext(front: str, address: str, tls: TlsConfig) -> None:
    if not tls.enabled and not is_loopback(address):
        log.warning(
            "the %s front listens on %s without TLS: anyone on that network can read and alter its "
            "traffic (API keys included); set security.tls.cert_file and key_file",
            front,
            address,
        )


def check_worker_link(address: str, security: SecurityConfig) -> None:
    """A worker link off loopback needs CURVE, or an explicit `trusted_network: true`."""
    if not security.curve.enabled and not security.trusted_network and not is_loopback(address):
        raise SecurityError(
            f"refusing the worker link on {address} without CURVE: anyone who can reach it could "
            "register as a worker and read prompts; set security.curve.enabled (scripts/keygen.py "
            "makes the keys) or, on a network you trust, security.trusted_network: true"
        )
    if security.trusted_network and not security.curve.enabled and not is_loopback(address):
        log.warning("worker link on %s without CURVE: trusted_network is set", address)


# ---- files


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SecurityError(f"cannot read the {what} {path}: {error.strerror or error}") from error


def _warn_if_readable_by_others(path: str, what: str) -> None:
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return  # the read that follows reports it
    # Group access is allowed: Kubernetes mounts secrets for a non-root pod through its fsGroup.
    if mode & stat.S_IRWXO:
        log.warning("the %s %s can be read by other users (mode %o): chmod 600 it", what, path, mode & 0o777)


# ---- TLS


@dataclass(frozen=True)
class _TlsMaterial:
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None


class TlsFiles:
    """The fronts' certificate, key and optional client CA, read from files and re-read on reload."""

    def __init__(self, tls: TlsConfig) -> None:
        if not tls.enabled:
            raise SecurityError("security.tls: cert_file and key_file are not set")
        self._config = tls
        self._lock = threading.Lock()
        self._material = self._load()
        self._generation = 0  # reloads so far: each gRPC server's credentials follow it on their own
        self._contexts: list[ssl.SSLContext] = []

    @property
    def mutual(self) -> bool:
        return self._config.client_ca_file is not None

    def reload(self) -> bool:
        """Re-read the files; on any problem keep the current ones. Returns whether it took."""
        try:
            material = self._load()
        except SecurityError as error:
            log.error("TLS reload failed, keeping the current certificate: %s", error)
            return False
        with self._lock:
            self._material = material
            self._generation += 1
            for context in self._contexts:
                self._load_into(context, material)
        log.info("TLS certificate reloaded from %s", self._config.cert_file)
        return True

    def grpc_server_credentials(self) -> grpc.ServerCredentials:
        """For `server.add_secure_port(address, credentials)`; follows reload() on new handshakes."""
        with self._lock:
            material, seen = self._material, self._generation

        def config_if_reloaded() -> grpc.ServerCertificateConfiguration | None:
            """gRPC asks before each handshake (in its own thread); None = keep the current one."""
            nonlocal seen
            with self._lock:
                if seen == self._generation:
                    return None
                seen = self._generation
                return self._grpc_config(self._material)

        return grpc.dynamic_ssl_server_credentials(
            self._grpc_config(material), config_if_reloaded, require_client_authentication=self.mutual
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context (TLS 1.2 or later) for aiohttp; follows reload() too."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        with self._lock:
            self._load_into(context, self._material)
            self._contexts.append(context)
        if self.mutual:
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _load(self) -> _TlsMaterial:
        config = self._config
        assert config.cert_file is not None and config.key_file is not None
        _warn_if_readable_by_others(config.key_file, "TLS private key")
        material = _TlsMaterial(
            cert_chain=_read(config.cert_file, "TLS certificate"),
            private_key=_read(config.key_file, "TLS private key"),
            client_ca=_read(config.client_ca_file, "TLS client CA") if config.client_ca_file else None,
        )
        self._load_into(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), material)  # validates
        return material

    def _load_into(self, context: ssl.SSLContext, material: _TlsMaterial) -> None:
        config = self._config
        try:
            context.load_cert_chain(config.cert_file, config.key_file)
            if material.client_ca is not None:
                context.load_verify_locations(cadata=material.client_ca.decode("ascii"))
        except (ssl.SSLError, OSError, UnicodeDecodeError, ValueError) as error:
            raise SecurityError(
                f"security.tls: {config.cert_file} / {config.key_file} / {config.client_ca_file}: "
                f"not a usable PEM certificate, key (matching it) and CA: {error}"
            ) from error

    def _grpc_config(self, material: _TlsMaterial) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(material.private_key, material.cert_chain)], root_certificates=material.client_ca
        )


# ---- API keys


def bearer_key(value: str | None) -> str | None:
    """The key of an `authorization: Bearer <key>` value, or None."""
    if value is None or value[: len(_BEARER)].lower() != _BEARER:
        return None
    return value[len(_BEARER) :].strip() or None


class ApiKeys:
    """The keys in a file, one a line ('#' starts a comment line). Re-read by reload()."""

    def __init__(self, path: str, count_refusal: RefusalCounter = _uncounted) -> None:
        self._path = path
        self._digests = self._load()
        self._refusals = RateLimitedWarning()
        self._count_refusal = count_refusal

    @property
    def count(self) -> int:
        return len(self._digests)

    def reload(self) -> bool:
        """Re-read the file; an unreadable or keyless file keeps the current keys."""
        try:
            digests = self._load()
        except SecurityError as error:
            log.error("API key reload failed, keeping the current %d keys: %s", self.count, error)
            return False
        self._digests = digests  # one assignment: a check sees the old list or the new one
        return True

    def allows(self, presented: str | None) -> bool:
        """Constant time in the presented key: its digest is compared with every known one."""
        if presented is None:
            return False
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return found

    def refused(self, where: str, peer: str, presented: str | None) -> None:
        """Log a refusal (rate-limited), naming the key by fingerprint only."""
        what = "no key" if presented is None else f"an unknown key {fingerprint(presented)}"
        self._count_refusal(REFUSED_API_KEY)
        self._refusals("refused a call to %s from %s: %s", where, peer, what)

    def _load(self) -> tuple[bytes, ...]:
        text = _read(self._path, "API key file").decode("utf-8", "replace")
        _warn_if_readable_by_others(self._path, "API key file")
        keys = []
        for number, line in enumerate(text.splitlines(), start=1):
            key = line.strip()
            if not key or key.startswith("#"):
                continue
            if len(key) < MIN_API_KEY_CHARS or any(char.isspace() for char in key):
                raise SecurityError(
                    f"{self._path} line {number}: a key must be at least {MIN_API_KEY_CHARS} "
                    "characters without spaces (scripts/keygen.py api-key makes one)"
                )
            keys.append(key)
        if not keys:
            raise SecurityError(f"{self._path} holds no API key: nobody could call the service")
        log.info("API keys loaded from %s: %s", self._path, ", ".join(fingerprint(key) for key in keys))
        return tuple(hashlib.sha256(key.encode()).digest() for key in keys)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every call needs a known key in its `authorization` metadata, except the open methods.
    A refused call gets UNAUTHENTICATED before its request is even parsed."""

    def __init__(self, keys: ApiKeys, open_methods: Iterable[str] = GRPC_HEALTH_METHODS) -> None:
        self._keys = keys
        self._open = frozenset(open_methods)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if details.method in self._open:
            return await continuation(details)
        presented = bearer_key(_metadata_value(details.invocation_metadata, "authorization"))
        if self._keys.allows(presented):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED as usual
        return _refusing_handler(handler, self._keys, details.method, presented)


def _metadata_value(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> str | None:
    for name, value in metadata or ():
        if name == key:
            return value if isinstance(value, str) else None
    return None


def _refusing_handler(
    handler: grpc.RpcMethodHandler, keys: ApiKeys, method: str, presented: str | None
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED."""

    async def refuse(_request: object, context: grpc.aio.ServicerContext) -> None:
        keys.refused(method, context.peer(), presented)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, KEY_NEEDED_MESSAGE)

    def ignore(_data: bytes) -> None:  # the request of a refused call is never parsed
        return None

    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(refuse, request_deserializer=ignore, response_serializer=handler.response_serializer)


def api_key_middleware(
    keys: ApiKeys, open_paths: Iterable[str] = HTTP_OPEN_PATHS, open_prefixes: Iterable[str] = ()
) -> Any:
    """An aiohttp middleware: a request without a known `Authorization: Bearer` key gets 401 and an
    OpenAI-style error object. `app = web.Application(middlewares=[api_key_middleware(keys)])`.
    Open without a key: `open_paths` (exact), paths under `open_prefixes` (e.g. "/static/"), and
    CORS preflights (OPTIONS: browsers never send credentials with them)."""
    from aiohttp import web  # only the HTTP front needs aiohttp

    open_set, prefixes = frozenset(open_paths), tuple(open_prefixes)

    @web.middleware
    async def require_api_key(request: web.Request, handler: Callable[..., Awaitable[Any]]) -> Any:
        path = request.path
        if path in open_set or (prefixes and path.startswith(prefixes)) or request.method == "OPTIONS":
            return await handler(request)
        presented = bearer_key(request.headers.get("Authorization"))
        if keys.allows(presented):
            return await handler(request)
        keys.refused(f"{request.method} {request.path}", request.remote or "?", presented)
        return web.json_response(
            {
                "error": {
                    "message": KEY_NEEDED_MESSAGE,
                    "type": "invalid_request_error" if presented is None else "authentication_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            },
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="bm-pool"'},
        )

    return require_api_key


@dataclass
class FrontSecurity:
    """What the fronts of one process share: TLS files, API keys and the settings; reloadable."""

    config: SecurityConfig
    tls: TlsFiles | None
    keys: ApiKeys | None
    admin_keys: ApiKeys | None  # the admin API's own keys; None = `keys`

    @classmethod
    def load(cls, config: SecurityConfig, count_refusal: RefusalCounter = _uncounted) -> FrontSecurity:
        tls = TlsFiles(config.tls) if config.tls.enabled else None
        keys = ApiKeys(config.api_keys_file, count_refusal) if config.api_keys_file else None
        admin_file = config.admin_api_keys_file
        admin_keys = ApiKeys(admin_file, count_refusal) if admin_file else None
        return cls(config, tls, keys, admin_keys)

    def grpc_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """For `grpc.aio.server(interceptors=...)`: the key check when keys are configured."""
        return self._interceptors(self.keys)

    def admin_grpc_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The same for the admin server, with the admin keys when they are configured."""
        return self._interceptors(self.admin_keys or self.keys)

    def _interceptors(self, keys: ApiKeys | None) -> list[grpc.aio.ServerInterceptor]:
        if keys is None:
            return []
        opened = GRPC_HEALTH_METHODS if self.config.open_health else ()
        return [ApiKeyInterceptor(keys, opened)]

    def add_port(self, server: grpc.aio.Server, address: str, front: str) -> int:
        """Bind `address` with TLS when configured (plain text otherwise, with a warning off
        loopback); returns the port, 0 if gRPC could not bind."""
        warn_if_plaintext(front, address, self.config.tls)
        if self.tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.tls.grpc_server_credentials())

    def ssl_context(self) -> ssl.SSLContext | None:
        """For aiohttp's TCPSite(ssl_context=...): None = plain HTTP."""
        return None if self.tls is None else self.tls.ssl_context()

    def http_middlewares(
        self, open_paths: Iterable[str] = HTTP_OPEN_PATHS, open_prefixes: Iterable[str] = ()
    ) -> list[Any]:
        """For `web.Application(middlewares=...)`: `open_paths` (health) are open when open_health
        is set, `open_prefixes` (a page's static files) always."""
        if self.keys is None:
            return []
        opened = open_paths if self.config.open_health else ()
        return [api_key_middleware(self.keys, opened, open_prefixes)]

    def reload(self) -> None:
        for reloadable in (self.tls, self.keys, self.admin_keys):
            if reloadable is not None:
                reloadable.reload()


# ---- CURVE


@dataclass(frozen=True)
class CurveKeyPair:
    public: bytes  # Z85, 40 bytes
    secret: bytes


def load_keypair(path: str) -> CurveKeyPair:
    """A keypair from a ZeroMQ certificate file with a secret key (NAME.key_secret)."""
    _warn_if_readable_by_others(path, "CURVE secret key")
    public, secret = _load_certificate(path, "CURVE secret key")
    if secret is None:
        raise SecurityError(f"{path} holds no secret key: give the NAME.key_secret file")
    return CurveKeyPair(public, secret)


def load_public_key(path: str) -> bytes:
    return _load_certificate(path, "CURVE public key")[0]


def _load_certificate(path: str, what: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:
        raise SecurityError(f"cannot read the {what} {path}: {error}") from error
    if not public:
        raise SecurityError(f"{path} is not a ZeroMQ certificate: no public-key line")
    return public, secret


class WorkerAllowlist:
    """Worker public keys from a directory of ZeroMQ certificate files (*.key), for pyzmq's
    authenticator (`configure_curve_callback`). Refusals are logged rate-limited, by fingerprint."""

    def __init__(self, directory: str, count_refusal: RefusalCounter = _uncounted) -> None:
        self._directory = directory
        self._keys = self._load()
        self._refusals = RateLimitedWarning()
        self._count_refusal = count_refusal
        self.peer_address = "?"  # set by the authenticator before each check (one thread)

    @property
    def count(self) -> int:
        return len(self._keys)

    def reload(self) -> bool:
        try:
            keys = self._load()
        except SecurityError as error:
            log.error("worker allowlist reload failed, keeping the current %d keys: %s", self.count, error)
            return False
        self._keys = keys
        return True

    def callback(self, _domain: str, client_key: bytes) -> bool:
        if client_key in self._keys:
            return True
        self._count_refusal(REFUSED_CURVE_KEY)
        self._refusals(
            "refused a worker connection from %s: its CURVE key %s is not in %s",
            self.peer_address,
            fingerprint(client_key),
            self._directory,
        )
        return False

    def _load(self) -> frozenset[bytes]:
        folder = Path(self._directory)
        if not folder.is_dir():
            raise SecurityError(f"the worker allowlist {folder} is not a directory")
        try:
            keys = frozenset(zmq.auth.load_certificates(folder))
        except (OSError, ValueError) as error:
            raise SecurityError(f"cannot read the worker allowlist {folder}: {error}") from error
        log.info(
            "worker allowlist %s: %d keys (%s)",
            folder,
            len(keys),
            ", ".join(sorted(fingerprint(key) for key in keys)) or "none: no worker can join",
        )
        return keys


class _AddressNotingAuthenticator(ThreadAuthenticator):
    """pyzmq's authenticator, telling the allowlist which address a handshake comes from (the
    credentials callback only gets the key) so a refusal can be logged with it."""

    def __init__(self, context: zmq.Context, allowlist: WorkerAllowlist) -> None:
        super().__init__(context, log=logging.getLogger("security.zap"))
        self._allowlist = allowlist

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) > 3:
            self._allowlist.peer_address = msg[3].decode("ascii", "replace")
        await super().handle_zap_message(msg)


_ROUTER_HANDSHAKE_FAILURES = {  # which of the two a plain-text peer causes varies
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "refused a worker connection: it failed the CURVE handshake "
    "(a protocol error)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "refused a worker connection: it failed the CURVE handshake "
    "(no detail from libzmq)",
}
_WORKER_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the router refused this worker's CURVE key: add its .key file to "
    "the router's allowed_workers_dir (then SIGHUP the router)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the CURVE handshake with the router failed: is "
    "router_public_key the router's key, and does the router run CURVE?",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the CURVE handshake with the router failed: is "
    "router_public_key the router's key, and does the router run CURVE?",
}


class _HandshakeFailureWatch(threading.Thread):
    """Logs (rate-limited) the failed handshakes of one socket, from libzmq's monitor events (which
    carry no peer address); ends when the socket is closed."""

    def __init__(
        self,
        socket: zmq.Socket,
        messages: dict[int, str],
        warn: RateLimitedWarning,
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(name="curve-handshake-watch", daemon=True)
        # A plain (blocking) PAIR on the socket's own context, whatever the socket's flavour
        # (zmq.asyncio's get_monitor_socket would return an asyncio socket).
        address = f"inproc://curve-handshake-watch-{id(self)}"
        socket.monitor(address, sum(messages) | zmq.EVENT_MONITOR_STOPPED)
        self._monitor = zmq.Context.shadow(socket.context.underlying).socket(zmq.PAIR)
        self._monitor.connect(address)
        self._messages = messages
        self._on_failure = on_failure
        self._warn = warn

    def run(self) -> None:
        try:
            while True:
                event = parse_monitor_message(self._monitor.recv_multipart())["event"]
                if event == zmq.EVENT_MONITOR_STOPPED:
                    return
                if event in self._messages:
                    self._on_failure()
                    self._warn(self._messages[event])
        except zmq.ContextTerminated:
            pass
        finally:
            self._monitor.close(linger=0)


class CurveServer:
    """The router side: its keypair, the allowlist and the authenticator thread for one context."""

    def __init__(
        self, config: CurveConfig, context: zmq.Context, count_refusal: RefusalCounter | None = None
    ) -> None:
        self._keypair = load_keypair(config.router_secret_key)
        self._count_refusal = count_refusal or _uncounted
        self.allowlist = WorkerAllowlist(config.allowed_workers_dir, self._count_refusal)
        self._watch: _HandshakeFailureWatch | None = None
        self._authenticator = _AddressNotingAuthenticator(context, self.allowlist)
        self._authenticator.start()
        self._authenticator.configure_curve_callback(_CURVE_DOMAIN, credentials_provider=self.allowlist)
        log.info("worker link: CURVE, router key %s", fingerprint(self._keypair.public))

    def secure(self, socket: zmq.Socket) -> None:
        """Make `socket` (before its bind) a CURVE server checked by the allowlist."""
        socket.curve_secretkey = self._keypair.secret
        socket.curve_publickey = self._keypair.public
        socket.curve_server = True
        socket.zap_domain = _CURVE_DOMAIN.encode()
        self._watch = _HandshakeFailureWatch(
            socket,
            _ROUTER_HANDSHAKE_FAILURES,
            RateLimitedWarning(),
            lambda: self._count_refusal(REFUSED_CURVE_HANDSHAKE),
        )
        self._watch.start()

    def reload(self) -> None:
        self.allowlist.reload()

    def stop(self) -> None:
        """After the socket is closed (which ends the watch), before the context is terminated."""
        self._authenticator.stop()
        if self._watch is not None:
            self._watch.join(timeout=_WATCH_JOIN_S)


class CurveClient:
    """The worker side: its keypair and the router's public key."""

    def __init__(self, config: CurveConfig) -> None:
        self._keypair = load_keypair(config.worker_secret_key)
        self._router_key = load_public_key(config.router_public_key)
        self._handshake_failures = RateLimitedWarning()  # one for all the sockets of this worker
        log.info(
            "worker link: CURVE, own key %s, router key %s",
            fingerprint(self._keypair.public),
            fingerprint(self._router_key),
        )

    def secure(self, socket: zmq.Socket) -> None:
        """Make `socket` (before its connect) a CURVE client of the router; its failed handshakes
        are logged (a DEALER retries them silently otherwise)."""
        socket.curve_secretkey = self._keypair.secret
        socket.curve_publickey = self._keypair.public
        socket.curve_serverkey = self._router_key
        _HandshakeFailureWatch(socket, _WORKER_HANDSHAKE_FAILURES, self._handshake_failures).start()
