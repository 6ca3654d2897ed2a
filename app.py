"""Tessera: fast high-resolution Stable Diffusion in the browser.

`python app.py` starts the web UI; `python app.py generate ...` / `python app.py upscale ...` run headless.
Nothing is loaded or downloaded at import time (Hugging Face Spaces imports this file).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("tessera")


def ui_parser() -> argparse.ArgumentParser:
    from pipelines.options import add_machine_options

    p = argparse.ArgumentParser(prog="python app.py", description="Start the Tessera web UI. "
                                "Subcommands: generate, upscale (see `python app.py generate --help`).")
    p.add_argument("--model", default=None, help="model loaded first (default: stable-diffusion-v1-5, "
                                                  "or tiny when offline)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="address to listen on")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="port")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (use --auth!)")
    p.add_argument("--auth", default=None, help="user:password required to open the UI (visible to other local "
                                                 "users in the process list: prefer --auth-file or TESSERA_AUTH)")
    p.add_argument("--auth-file", default=None, metavar="FILE",
                   help="file of user:password lines (several users; blank lines and # comments are skipped)")
    p.add_argument("--trusted-proxy", default=None, metavar="IP[,IP]",
                   help="reverse proxies whose X-Forwarded-For header names the client (login back-off per client); "
                        "default: the header is believed from no one")
    add_machine_options(p.add_argument_group("machine"))
    p.add_argument("--queue-size", type=int, default=16, help="maximum waiting requests before new ones are refused")
    add_worker_args(p)
    return p


def add_worker_args(p: argparse.ArgumentParser) -> None:
    """--ray (a Ray Serve cluster of workers); --devices is a machine option."""
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="serve through a Ray Serve cluster: start a local one, or join ADDRESS (e.g. ray://head:10001 "
                        "or auto); needs `pip install \"ray[serve]\"`")
    p.add_argument("--min-workers", type=int, default=1, help="Ray: fewest TesseraWorker replicas (default 1)")
    p.add_argument("--max-workers", type=int, default=None, help="Ray: most replicas (default: --min-workers)")


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """"user:pass" -> (user, pass); raises SystemExit with a clear message when malformed."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password.strip():
        raise SystemExit("error: `--auth` must be user:password (both non-empty), e.g. --auth alice:s3cret")
    return user, password


def auth_users(args: argparse.Namespace) -> dict[str, str]:
    """The users allowed in: --auth, --auth-file and the TESSERA_AUTH environment variable (user:password), so a
    password need not appear in the process list; SystemExit with a one-line message when one is malformed."""
    from ui.auth import AuthError, collect_users

    try:
        return collect_users(args.auth, args.auth_file, os.environ.get("TESSERA_AUTH"))
    except AuthError as exc:
        raise SystemExit(f"error: {exc}") from None


def trusted_proxies(args: argparse.Namespace) -> list[str]:
    """--trusted-proxy for the server about to start (ui.auth.trust_proxies); SystemExit with one line if bad."""
    from ui.auth import AuthError, trust_proxies

    try:
        return trust_proxies(args.trusted_proxy)
    except AuthError as exc:
        raise SystemExit(f"error: {exc}") from None


def share_warning(share: bool, auth: object | None) -> str | None:
    """The warning for a public link without a password (anyone with the link can use the GPU), else None."""
    if share and auth is None:
        return ("--share without --auth: anyone with the link can use your GPU. Add --auth-file FILE (user:password "
                "lines) or set TESSERA_AUTH=user:password.")
    return None


def build_demo(args: argparse.Namespace):
    """Compose the engine with the UI (no weights are loaded until the first request)."""
    from pipelines.factory import build_engine
    from pipelines.serving.service import make_backend
    from ui.app import create_demo

    if getattr(args, "ray", None) is not None:
        return _build_ray_demo(args)
    engine = build_engine(args, pool=True)  # a worker per --devices entry (`pipelines.factory`)
    if args.model:
        engine.default_model = args.model
    notice = engine.manager.availability(engine.default_model)
    if notice:
        log.warning("%s", notice)
    return create_demo(make_backend(engine), queue_size=args.queue_size, workers=len(engine))


def _build_ray_demo(args: argparse.Namespace):
    """The UI as the one ingress of a Ray Serve cluster of TesseraWorker replicas (`pipelines.serving.cluster`)."""
    from pipelines.factory import build_cluster
    from ui.app import create_demo

    backend = build_cluster(args)
    return create_demo(backend, queue_size=args.queue_size, workers=backend.engine.max_workers)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("generate", "upscale"):
        from cli import main as cli_main

        return cli_main(argv)
    args = ui_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parse_auth(args.auth)  # the historical message for a malformed --auth
    users = auth_users(args)
    trusted_proxies(args)
    if (warning := share_warning(args.share, users or None)) is not None:
        log.warning(warning)
    from pipelines.errors import TesseraError

    try:
        demo = build_demo(args)
    except TesseraError as exc:  # e.g. --attention xformers without xformers: one line, exit 2 like the CLI
        sys.stderr.write(f"error: {exc}\n")
        return 2
    from ui.app import launch_kwargs
    from ui.auth import auth_launch_kwargs

    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **auth_launch_kwargs(users),
                **launch_kwargs())
    return 0


if __name__ == "__main__":
    sys.exit(main())
