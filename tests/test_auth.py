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
