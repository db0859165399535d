"""Which Prefect API a `spin run` uses: PREFECT_API_URL, a live `spin serve`, else its own."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from flows import server


@pytest.fixture
def healthy_api():
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/api"
    httpd.shutdown()


def test_a_live_spin_serve_is_used_and_a_dead_one_is_not(tmp_path, monkeypatch, healthy_api):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with server.announce_served(healthy_api):
        assert server.served_api() == healthy_api
        with server.api_for_run() as started:
            assert started is None  # nothing started: the runs go to the serving API
            assert os.environ["PREFECT_API_URL"] == healthy_api
    assert not (tmp_path / "spin-serve.json").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "spin-serve.json").write_text(json.dumps({"pid": dead.pid, "url": healthy_api}))
    assert server.served_api() is None


def test_prefect_api_url_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    with server.api_for_run() as started:
        assert started is None
        assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:1/api"


def test_the_temporary_server_starts_in_its_own_session_and_stops(tmp_path, monkeypatch):
    """Its own session: a Ctrl-C to the terminal's process group does not reach it."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(server, "_configured_api", lambda: None)
    with server.api_for_run() as started:
        assert started is not None
        assert os.getpgid(started.process.pid) != os.getpgid(0)
        assert os.getsid(started.process.pid) == started.process.pid
        assert os.environ["PREFECT_API_URL"] == started.url
    assert started.process.poll() is not None
    assert "PREFECT_API_URL" not in os.environ


@pytest.mark.slow  # real flows on a Prefect server
def test_flows_on_the_temporary_server_send_no_heartbeats(tmp_path, monkeypatch):
    """A flow run against the temporary server runs without Prefect's heartbeat thread (its
    exit waited up to 1 s for it, per flow: one per iteration); against any other server
    (server None) Prefect's default stands."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(server, "_configured_api", lambda: None)
    from prefect import flow
    from prefect.settings import get_current_settings

    @flow
    def heartbeat_setting() -> int | None:
        return get_current_settings().flows.heartbeat_frequency

    default = get_current_settings().flows.heartbeat_frequency
    with server.api_for_run() as started:
        with server.ready_for_flows(started):
            assert heartbeat_setting() is None
        with server.ready_for_flows(None):
            assert get_current_settings().flows.heartbeat_frequency == default
