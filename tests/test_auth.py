"""Logins: users from --auth-file / TESSERA_AUTH, the constant-time check, and the per-client back-off (a fake
clock, then a real server on 127.0.0.1)."""

from __future__ import annotations

import argparse
import time

import httpx
import pytest

from ui.auth import (
    AuthError,
    LoginLimiter,
    auth_launch_kwargs,
    collect_users,
    password_check,
    read_auth_file,
)


def test_auth_file_several_users_comments_and_blank_lines(tmp_path):
    f = tmp_path / "users.txt"
    f.write_text("# who may log in\nalice:s3cret\n\n  bob : pa:ss:word  \n# carol:old\n", encoding="utf-8")
    assert read_auth_file(f) == {"alice": "s3cret", "bob": " pa:ss:word"}


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    ("", "has no user:password line"),
    ("# only a comment\n\n", "has no user:password line"),
    ("alice:ok\nbob-topsecret\n", "line 2 must be user:password"),
    ("alice:ok\n:topsecret\n", "line 2 must be user:password"),
    ("alice:\n", "line 1 must be user:password"),
])
def test_auth_file_errors_are_one_clear_line(tmp_path, content, message):
    f = tmp_path / "users.txt"
    if content is not None:
        f.write_text(content, encoding="utf-8")
    with pytest.raises(AuthError) as err:
        read_auth_file(f)
    assert message in str(err.value) and "topsecret" not in str(err.value) and "\n" not in str(err.value)


def test_env_file_and_option_are_merged_later_wins(tmp_path):
    f = tmp_path / "users.txt"
    f.write_text("bob:from-file\nalice:from-file\n", encoding="utf-8")
    users = collect_users("alice:from-option", str(f), "carol:from-env")
    assert users == {"carol": "from-env", "bob": "from-file", "alice": "from-option"}


def _args(**kw) -> argparse.Namespace:
    from app import ui_parser

    argv = [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", v)]
    return ui_parser().parse_args(argv)


def test_app_reads_tessera_auth_and_auth_file(tmp_path, monkeypatch):
    from app import auth_users

    monkeypatch.setenv("TESSERA_AUTH", "alice:env-pass")
    assert auth_users(_args()) == {"alice": "env-pass"}
    f = tmp_path / "users.txt"
    f.write_text("bob:file-pass\n", encoding="utf-8")
    assert auth_users(_args(auth_file=str(f))) == {"alice": "env-pass", "bob": "file-pass"}
    monkeypatch.setenv("TESSERA_AUTH", "no-colon-topsecret")
    with pytest.raises(SystemExit) as err:
        auth_users(_args())
    assert str(err.value.code).startswith("error: `TESSERA_AUTH` must be user:password")
    assert "topsecret" not in str(err.value.code)
    monkeypatch.delenv("TESSERA_AUTH")
    with pytest.raises(SystemExit, match="`--auth-file` .* does not exist"):
        auth_users(_args(auth_file=str(tmp_path / "missing.txt")))


def test_password_check():
    check = password_check({"alice": "s3cret", "bob": "pa:ss"})
    assert check("alice", "s3cret") and check("bob", "pa:ss")
    assert not check("alice", "pa:ss") and not check("bob", "s3cret") and not check("carol", "s3cret")
    assert not check("alice", "s3cre") and not check("alice", "s3cret ") and not check("alice", "\ud800")


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_backs_off_exponentially_and_a_success_resets():
    clock = FakeClock()
    lim = LoginLimiter(free=3, base_s=1.0, max_s=10.0, clock=clock)
    assert [lim.failed("a") for _ in range(3)] == [0, 0, 0] and lim.retry_after("a") == 0
    waits = []
    for _ in range(6):
        waits.append(lim.failed("a"))
        assert lim.retry_after("a") == pytest.approx(waits[-1])
        clock.now += waits[-1]
        assert lim.retry_after("a") == 0
    assert waits == [1, 2, 4, 8, 10, 10]  # doubling, capped at max_s
    lim.succeeded("a")
    assert lim.failed("a") == 0  # counting starts again


def test_limiter_clients_are_independent_and_bounded():
    clock = FakeClock()
    lim = LoginLimiter(free=1, base_s=5.0, max_clients=3, clock=clock)
    lim.failed("a"), lim.failed("a")
    assert lim.retry_after("a") == 5 and lim.retry_after("b") == 0
    for c in ("b", "c", "d"):
        lim.failed(c)
    assert lim.retry_after("a") == 0  # the oldest client was forgotten: memory stays bounded


def _login(client: httpx.Client, url: str, password: str) -> httpx.Response:
    return client.post(url + "login", data={"username": "alice", "password": password})


@pytest.mark.xdist_group("gradio-app")
def test_real_server_refuses_a_guesser_and_lets_the_right_password_in(engine):
    from gradio_client import Client

    from tests.conftest import running_app

    limiter = LoginLimiter(free=3, base_s=0.5, max_s=60)
    with running_app(engine, auth=auth_launch_kwargs({"alice": "s3cret"}, limiter)) as url:
        guesser = httpx.Client(timeout=30)
        other = httpx.Client(timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        started = time.monotonic()
        answers = [_login(guesser, url, f"guess{i}") for i in range(20)]
        elapsed = time.monotonic() - started
        codes = [r.status_code for r in answers]
        assert codes[:3] == [400, 400, 400] and codes[3] == 400  # 3 free failures, the 4th starts the back-off
        refused = [r for r in answers if r.status_code == 429]
        assert len(refused) >= 15, (codes, elapsed)  # not 20 passwords checked at full speed
        assert "too many failed logins, try again in" in refused[0].json()["detail"]
        assert int(refused[0].headers["Retry-After"]) >= 1
        assert _login(guesser, url, "s3cret").status_code == 429  # even the right one waits while backing off
        assert _login(other, url, "s3cret").status_code == 200  # another client is not affected
        time.sleep(limiter.retry_after("127.0.0.1") + 0.05)
        assert _login(guesser, url, "s3cret").status_code == 200  # after the back-off the password works
        assert _login(guesser, url, "wrong").status_code == 400  # and the success reset the count
        Client(url, auth=("alice", "s3cret"), verbose=False)  # gradio_client logs in the same way


def _logins_from(url: str, forwarded: list[str], local_address: str = "127.0.0.1") -> list[int]:
    """One failed login per X-Forwarded-For value, from `local_address`; the status codes."""
    with httpx.Client(timeout=30, transport=httpx.HTTPTransport(local_address=local_address)) as http:
        return [http.post(url + "login", data={"username": "alice", "password": "guess"},
                          headers={"X-Forwarded-For": ip}).status_code for ip in forwarded]


@pytest.mark.xdist_group("gradio-app")
def test_forwarded_for_is_believed_only_from_a_trusted_proxy(engine, monkeypatch):
    from tests.conftest import running_app
    from ui.auth import trust_proxies

    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "127.0.0.1")  # uvicorn's own default trusts loopback
    rotating = [f"10.0.0.{i}" for i in range(12)]
    assert trust_proxies(None) == []  # what `python app.py` does without --trusted-proxy
    limiter = LoginLimiter(free=3, base_s=30, max_s=60)
    with running_app(engine, auth=auth_launch_kwargs({"alice": "s3cret"}, limiter)) as url:
        codes = _logins_from(url, rotating)
        assert codes[:4] == [400] * 4 and set(codes[4:]) == {429}, codes  # a new address per try dodges nothing
        assert _logins_from(url, ["127.0.0.3"] * 5, local_address="127.0.0.2")[-1] == 429
        with httpx.Client(timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.3")) as victim:
            assert _login(victim, url, "s3cret").status_code == 200  # the header named it; it was not locked out
    assert trust_proxies("127.0.0.1") == ["127.0.0.1/32"]  # --trusted-proxy 127.0.0.1
    limiter = LoginLimiter(free=3, base_s=30, max_s=60)
    with running_app(engine, auth=auth_launch_kwargs({"alice": "s3cret"}, limiter)) as url:
        assert _logins_from(url, rotating) == [400] * 12  # through the proxy: each client its own back-off
        codes = _logins_from(url, ["10.0.0.99"] * 6)
        assert codes[:4] == [400] * 4 and set(codes[4:]) == {429}, codes  # the header's client backs off
        assert limiter.retry_after("10.0.0.99") > 0 and limiter.retry_after("127.0.0.1") == 0
        assert set(_logins_from(url, rotating, local_address="127.0.0.2")[4:]) == {429}  # not the proxy: ignored


def test_trusted_proxy_option_is_checked():
    from app import trusted_proxies, ui_parser

    with pytest.raises(SystemExit) as err:
        trusted_proxies(ui_parser().parse_args(["--trusted-proxy", "127.0.0.1,proxy.local"]))
    assert str(err.value.code) == ("error: `--trusted-proxy` 'proxy.local' is not an IP address or network; give the "
                                   "proxy's address, e.g. 127.0.0.1 or 10.0.0.0/8, comma-separated")


@pytest.mark.xdist_group("gradio-app")
def test_cancel_and_heartbeat_need_a_login(engine):
    from tests.conftest import running_app

    cancel = {"session_hash": "abc", "fn_index": 0, "event_id": "e1"}
    with running_app(engine, auth=auth_launch_kwargs({"alice": "s3cret"})) as url, \
            httpx.Client(timeout=30) as anonymous, httpx.Client(timeout=30) as alice:
        answer = anonymous.post(url + "gradio_api/cancel", json=cancel)
        assert answer.status_code == 401 and answer.json()["detail"]["error"] == "Not authenticated"
        with anonymous.stream("GET", url + "gradio_api/heartbeat/abc") as beat:
            assert beat.status_code == 401
        assert anonymous.post(url + "gradio_api/queue/join", json={}).status_code == 401  # as Gradio's own routes
        assert _login(alice, url, "s3cret").status_code == 200
        answer = alice.post(url + "gradio_api/cancel", json=cancel)
        assert answer.status_code == 200 and answer.json() == {"success": True}
        with alice.stream("GET", url + "gradio_api/heartbeat/abc") as beat:
            assert beat.status_code == 200
