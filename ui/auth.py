"""Logins: users from --auth, --auth-file or TESSERA_AUTH, a constant-time password check, and a per-client
back-off on failed logins.

Gradio calls an auth callable with (username, password) only, so it cannot tell clients apart. The back-off
therefore sits in a small ASGI middleware on Gradio's own FastAPI app (passed through `launch(app_kwargs=...)`):
it sees every POST to /login with the client's address, refuses a client that is backing off with HTTP 429 "too
many failed logins, try again in N s" before the password is looked at, and learns the outcome from the status
(200 = success, which resets that client; 400 = wrong credentials). Other clients keep their own counters.
Behind a reverse proxy or Gradio's share tunnel every client has the proxy's address and shares one back-off,
which still stops password guessing but lets one guesser delay everyone, unless `--trusted-proxy` names that
proxy: only then is its X-Forwarded-For header believed (`trust_proxies`). Uvicorn would otherwise believe the header
from any loopback client, so a client on the same host could dodge its back-off with a new address per try, or
lock another address out.

Gradio leaves two routes open without a login, `/gradio_api/cancel` and `/gradio_api/heartbeat/...`;
`RequireLogin` answers them 401 like Gradio's other routes until the client has logged in.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class AuthError(ValueError):
    """A malformed --auth / --auth-file / TESSERA_AUTH value; the message names the source and the fix."""


def parse_user(text: str, source: str, where: str = "") -> tuple[str, str]:
    """"user:password" -> (user, password); the password may contain ':'; both must be non-empty."""
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password.strip():
        raise AuthError(f"`{source}`{where} must be user:password (both non-empty)")
    return user.strip(), password


def read_auth_file(path: str | Path) -> dict[str, str]:
    """Users from a file of `user:password` lines (like Gradio's own auth file); blank lines and # comments are
    skipped. A missing or unreadable file, a malformed line, or a file without users raise AuthError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AuthError(f"`--auth-file` {path} does not exist; create it with one user:password per line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthError(f"`--auth-file` {path} cannot be read ({type(exc).__name__}); it must be a UTF-8 text "
                        f"file of user:password lines") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, password = parse_user(line, "--auth-file", f" {path} line {number}")  # never echo the line
        users[user] = password
    if not users:
        raise AuthError(f"`--auth-file` {path} has no user:password line")
    return users


def collect_users(auth: str | None, auth_file: str | None, env: str | None) -> dict[str, str]:
    """Every configured user: TESSERA_AUTH, then --auth-file, then --auth (a later source wins for a user)."""
    users: dict[str, str] = {}
    if env:
        users.update([parse_user(env, "TESSERA_AUTH")])
    if auth_file:
        users.update(read_auth_file(auth_file))
    if auth is not None:
        users.update([parse_user(auth, "--auth")])
    return users


def password_check(users: dict[str, str]) -> Callable[[str, str], bool]:
    """Gradio's auth callable: hmac.compare_digest against every user, so the time taken tells nothing."""
    table = [(u.encode("utf-8"), p.encode("utf-8")) for u, p in users.items()]

    def check(username: str, password: str) -> bool:
        given_user = str(username).encode("utf-8", "surrogatepass")
        given_password = str(password).encode("utf-8", "surrogatepass")
        ok = False
        for user, expected in table:  # no early exit
            ok |= hmac.compare_digest(user, given_user) & hmac.compare_digest(expected, given_password)
        return ok

    return check


class LoginLimiter:
    """Per-client exponential back-off: the first `free` failures in a row cost nothing; after that the n-th
    failure makes the client wait base_s * 2**(n - free - 1) seconds (at most max_s) before its next try, and
    tries while it waits are refused unchecked (they do not count). A success
    forgets the client. Only the `max_clients` most recent clients are remembered."""

    def __init__(self, *, free: int = 3, base_s: float = 1.0, max_s: float = 300.0, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.free, self.base_s, self.max_s, self.max_clients, self.clock = free, base_s, max_s, max_clients, clock
        self._clients: OrderedDict[str, tuple[int, float]] = OrderedDict()  # client -> (failures, blocked until)
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try again (0 = now)."""
        with self._lock:
            _, until = self._clients.get(client, (0, 0.0))
        return max(0.0, until - self.clock())

    def failed(self, client: str) -> float:
        """Count a failed login; returns the back-off it starts (0 while still free)."""
        with self._lock:
            failures = self._clients.pop(client, (0, 0.0))[0] + 1
            wait = 0.0 if failures <= self.free else min(self.max_s, self.base_s * 2 ** (failures - self.free - 1))
            self._clients[client] = (failures, self.clock() + wait)
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
        if wait:
            log.warning("login: %d failures in a row from %s; next try in %.0f s", failures, client, wait)
        return wait

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)


class LoginRateLimit:
    """ASGI middleware: POST .../login goes through `limiter` (see the module docstring)."""

    def __init__(self, app: Any, limiter: LoginLimiter):
        self.app, self.limiter = app, limiter

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].rstrip("/").endswith(
                "/login"):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.limiter.retry_after(client)
        if wait > 0:
            from starlette.responses import JSONResponse

            seconds = math.ceil(wait)
            response = JSONResponse({"detail": f"too many failed logins, try again in {seconds} s"},
                                    status_code=429, headers={"Retry-After": str(seconds)})
            await response(scope, receive, send)
            return
        status: list[int] = []

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, receive, watch)
        if status and status[0] == 200:
            self.limiter.succeeded(client)
        elif status and status[0] in (400, 401):
            self.limiter.failed(client)


OPEN_ROUTES = re.compile(r"/gradio_api/(cancel/?|heartbeat/.*)$")


class RequireLogin:
    """ASGI middleware: the routes Gradio leaves open (OPEN_ROUTES) need a login too, checked as Gradio does
    (its access-token cookie, or the app's auth dependency)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        gradio_app = scope.get("app")
        if scope["type"] == "http" and OPEN_ROUTES.search(scope["path"]) and gradio_app is not None \
                and (getattr(gradio_app, "auth", None) or getattr(gradio_app, "auth_dependency", None)):
            from starlette.requests import Request
            from starlette.responses import JSONResponse

            request = Request(scope)
            if gradio_app.auth_dependency is not None:
                user = gradio_app.auth_dependency(request)
                if hasattr(user, "__await__"):
                    user = await user
            else:
                cookie = gradio_app.cookie_id
                token = request.cookies.get(f"access-token-{cookie}") or request.cookies.get(
                    f"access-token-unsecure-{cookie}")
                user = gradio_app.tokens.get(token)
            if user is None:
                response = JSONResponse({"detail": {"error": "Not authenticated"}}, status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def trust_proxies(proxies: str | None) -> list[str]:
    """Believe X-Forwarded-For only from `proxies` ("IP[,IP or network...]"; None: from nobody).

    Uvicorn (which Gradio starts) reads its trusted list from FORWARDED_ALLOW_IPS when the server starts, and
    trusts loopback without it; this sets that variable for the server this process launches. Returns the list;
    a malformed address raises AuthError."""
    trusted: list[str] = []
    for item in (proxies or "").split(","):
        if not item.strip():
            continue
        try:
            trusted.append(str(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError:
            raise AuthError(f"`--trusted-proxy` {item.strip()!r} is not an IP address or network; give the "
                            f"proxy's address, e.g. 127.0.0.1 or 10.0.0.0/8, comma-separated") from None
    os.environ["FORWARDED_ALLOW_IPS"] = ",".join(trusted)  # empty: uvicorn trusts no client's header
    if trusted:
        log.info("X-Forwarded-For is believed from %s only", ", ".join(trusted))
    return trusted


def auth_launch_kwargs(users: dict[str, str], limiter: LoginLimiter | None = None) -> dict[str, Any]:
    """`demo.launch` keyword arguments for password logins with a per-client back-off, and a login required on
    every route ({} without users)."""
    if not users:
        return {}
    from starlette.middleware import Middleware

    limiter = limiter or LoginLimiter()
    return {"auth": password_check(users),
            "app_kwargs": {"middleware": [Middleware(RequireLogin), Middleware(LoginRateLimit, limiter=limiter)]}}
