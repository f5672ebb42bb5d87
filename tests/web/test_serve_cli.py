"""`nnvitals serve` from the command line: it serves, warns when it is reachable from elsewhere, and turns
a taken port, an unknown host or a foreign database into one error line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from .conftest import free_port


def test_a_taken_port_is_one_error_line(run_cli, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_cli("serve", "--port", str(port), "--db", str(tmp_path / "db.sqlite3"))
    assert code == 2
    assert err == f"error: port {port} is already in use on 127.0.0.1; choose another with --port\n"


def test_an_unknown_host_or_a_foreign_database_is_one_error_line(run_cli, tmp_path):
    code, _, err = run_cli("serve", "--host", "no-such-host.invalid", "--db", str(tmp_path / "db.sqlite3"))
    assert code == 2 and err.startswith("error: --host 'no-such-host.invalid'") and err.count("\n") == 1
    notes = tmp_path / "notes.db"
    notes.write_text("not a database\n")
    code, _, err = run_cli("serve", "--db", str(notes), "--port", str(free_port()))
    assert code == 2 and "not an SQLite database" in err and err.count("\n") == 1
    code, _, err = run_cli("serve", "--port", "70000")
    assert code == 2 and "--port" in err


def test_serve_answers_and_warns_when_reachable_from_elsewhere(tmp_path):
    port = free_port()
    env = {**os.environ, "NNVITALS_DB": str(tmp_path / "db.sqlite3")}
    server = subprocess.Popen([sys.executable, "-c", "import sys; from nnvitals.cli import main; sys.exit(main())",
                               "serve", "--host", "0.0.0.0", "--port", str(port), "--runs", str(tmp_path / "runs")],
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/flashcards", timeout=2) as r:
                    page = r.read().decode()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert "Print flashcards" in page
    finally:
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0
    assert err.startswith(f"warning: listening on 0.0.0.0:{port}, beyond this machine")
    assert f"http://127.0.0.1:{port}/" in err and str(tmp_path / "db.sqlite3") in err
