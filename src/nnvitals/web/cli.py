"""`nnvitals serve`: the lesson page on this machine."""

from __future__ import annotations

import errno
import socket
import threading
import webbrowser
from pathlib import Path

import click

from nnvitals.study import store
from nnvitals.web.guard import is_loopback


def _bad(message: str) -> Exception:
    from nnvitals.cli import BadInput  # imported here: nnvitals.cli imports this module while loading

    return BadInput(message)


def _listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket before the server starts, so a taken port or a bad host is one error line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise _bad(f"--host {host!r} is not an address or a name this machine can resolve ({e}); "
                   "the default 127.0.0.1 keeps the page on this machine") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise _bad(f"port {port} is already in use on {host}; choose another with --port") from None
        raise _bad(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


@click.command(context_settings={"help_option_names": ["-h", "--help"]},
               short_help="The lesson as a local web page: lesson, exercise, flashcards, review, lab.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback makes the page reachable from other machines.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
@click.option("--runs", "runs_dir", default="runs", show_default=True, metavar="DIR",
              type=click.Path(file_okay=False, path_type=Path),
              help="The lab's runs folder: its runs are listed, and runs started from the page go there.")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help=f"Review database (default: the one `nnvitals study review` uses: ${store.ENV_VAR}, else "
                   f"$XDG_DATA_HOME/nnvitals/{store.FILE_NAME}).")
def serve(host: str, port: int, open_browser: bool, runs_dir: Path, db: Path | None) -> None:
    """Serve the lesson on this machine: practice questions, the diagnosis exercise with calculators,
    flashcards (and their print layout), FSRS review sharing the terminal's database, and the lab's runs
    with a button to start one.

    Everything is served locally, nothing is fetched from elsewhere. Ctrl-C stops it (and a lab run
    started from the page, which keeps its checkpoint).
    """
    import uvicorn

    from nnvitals.web.app import create_app

    db_path = db if db is not None else store.default_path()
    try:
        store.open_store(db_path).close()  # refuse a foreign or damaged file now, not on the first grade
    except store.StoreError as e:
        raise _bad(str(e)) from None
    sock = _listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{port}/"
    if not is_loopback(host):
        click.echo(f"warning: listening on {shown}:{port}, beyond this machine: anyone who can reach it on the "
                   "network can read the page, grade your flashcards and start lab runs. Leave out --host "
                   "(127.0.0.1) to keep it private.", err=True)
    click.echo(f"nnvitals lesson page: {url}  (reviews: {db_path}; lab runs: {runs_dir})  Ctrl-C stops it", err=True)
    app = create_app(runs_dir, db_path, host=host, port=port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    if open_browser:
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on; stopping is the normal end
        pass
    finally:
        sock.close()
    click.echo("stopped", err=True)
