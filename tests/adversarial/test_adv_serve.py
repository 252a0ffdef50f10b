"""Hostile clients against ``medeyes serve`` (issue 21, items 7-12): a real server on 127.0.0.1, real sockets.

Each test is one finding of the third hostile round; every loop is bounded by a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("openenv", reason="needs the serve extra: pip install 'medeyes[serve]'")

import httpx
from PIL import Image
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from medeyes_env.serving.server import ServeConfig, background_server

TOKEN = "s3cret-token-for-tests"
RESET = json.dumps({"type": "reset", "data": {"seed": 0}})


def ws_url(base: str, path: str = "/ws") -> str:
    return base.replace("http://", "ws://") + path


def reset_over(ws) -> dict:
    ws.send(RESET)
    return json.loads(ws.recv(timeout=30))


@pytest.fixture(scope="module")
def url():
    with background_server(ServeConfig(port=0, max_sessions=4)) as base:
        yield base


# -- 7: Origin and Host ------------------------------------------------------------------------------


def test_a_browser_origin_cannot_open_a_session(url):
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(url), origin="https://evil.example")
    assert refused.value.response.status_code == 403
    response = httpx.post(url + "/reset", json={"seed": 0}, headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert response.json() == {
        "detail": "Origin 'https://evil.example' is not allowed: browsers are not clients "
        "(start the server with --allow-origin https://evil.example to allow this page)"
    }
    with connect(ws_url(url)) as ws:  # a program sends no Origin and plays as before
        assert reset_over(ws)["type"] == "observation"


def test_an_allowed_origin_plays():
    config = ServeConfig(port=0, allow_origins=["http://localhost:3000"])
    with background_server(config) as base:
        with connect(ws_url(base), origin="http://localhost:3000") as ws:
            assert reset_over(ws)["type"] == "observation"
        with pytest.raises(InvalidStatus):
            connect(ws_url(base), origin="http://localhost:3001")


def test_dns_rebinding_a_token_less_server_is_refused(url):
    # A page on evil.example whose name now resolves to 127.0.0.1: the browser sends Host: evil.example.
    port = url.rsplit(":", 1)[1]
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
        response = httpx.post(url + "/reset", json={"seed": 0}, headers={"Host": host})
        assert response.status_code == 403, host
        assert response.json()["detail"].startswith(f"Host {host.split(':')[0]!r} is not a loopback name")
        with pytest.raises(InvalidStatus) as refused:  # the URL names evil.example, the socket reaches loopback
            connect(f"ws://{host}/ws", sock=socket.create_connection(("127.0.0.1", int(port))))
        assert refused.value.response.status_code == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST"):
        assert httpx.post(url + "/reset", json={"seed": 0}, headers={"Host": host}).status_code == 200


# -- 8: OpenEnv's MCP sessions and list_tasks -------------------------------------------------------


def test_mcp_sessions_are_gone_and_cannot_hold_slots():
    with background_server(ServeConfig(port=0, max_sessions=1)) as base:
        # POST /mcp is MedEyes' own stateless JSON-RPC answer (no tools): OpenEnv's session methods are not found
        created = httpx.post(base + "/mcp", json={"jsonrpc": "2.0", "method": "openenv/session/create", "id": 1})
        assert created.status_code == 200 and created.json()["error"]["code"] == -32601
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url(base, "/mcp"))
        assert refused.value.response.status_code == 403  # a refused WebSocket handshake is always 403
        with pytest.raises(InvalidStatus):
            connect(ws_url(base, "/ws?session_id=anything"))
        for path in ("/medeyes/tasks", "/other_env/splits"):  # list_tasks (2**31 phantom tasks) and other names
            assert httpx.post(base + path, json={"split": "test"}).status_code == 404
        with connect(ws_url(base)) as ws:  # the one slot is still free
            assert reset_over(ws)["type"] == "observation"


# -- 9: ENABLE_WEB_INTERFACE -----------------------------------------------------------------------------


def test_the_web_interface_variable_is_ignored_and_said(monkeypatch):
    monkeypatch.setenv("ENABLE_WEB_INTERFACE", "true")
    with background_server(ServeConfig(port=0)) as base:
        assert httpx.get(base + "/web").status_code == 404
        assert httpx.get(base + "/web/reset").status_code == 404
    lines = _cli_start_lines(["--port", "0"], {"ENABLE_WEB_INTERFACE": "true"})
    assert "ENABLE_WEB_INTERFACE=true is ignored" in lines


def _cli_start_lines(args: list[str], extra_env: dict[str, str]) -> str:
    """Start ``medeyes serve`` in a subprocess, return what it printed before serving, and stop it."""
    env = {**os.environ, **extra_env, "COLUMNS": "300"}
    code = "from medeyes.cli.app import main; main()"
    process = subprocess.Popen(
        [sys.executable, "-c", code, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    try:
        out = ""
        deadline = time.monotonic() + 120
        while "ws://" not in out and time.monotonic() < deadline and process.poll() is None:
            out += process.stdout.readline().decode(errors="replace")
        return out
    finally:
        process.terminate()
        process.wait(timeout=30)


# -- 10: fail closed -------------------------------------------------------------------------------------


def _run_cli(args: list[str], env: dict[str, str | None]) -> tuple[int | None, str]:
    """``medeyes serve ARGS`` in a subprocess: (exit code, output); (None, output) if it was still serving at 60 s."""
    full_env = {key: value for key, value in {**os.environ, **env, "COLUMNS": "300"}.items() if value is not None}
    code = "from medeyes.cli.app import main; main()"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, "serve", "--port", "0", *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=60,
        )
    except subprocess.TimeoutExpired as expired:  # it started serving: the finding
        return None, str(expired.stdout)
    return done.returncode, done.stdout + done.stderr


def test_no_token_means_loopback_only():
    for host in ("0.0.0.0", "::", "192.0.2.7"):
        for gold in (False, True):
            with pytest.raises(ValueError, match=f"host {re.escape(repr(host))} is not a loopback address"):
                ServeConfig(host=host, include_gold=gold)
    assert ServeConfig(host="0.0.0.0", token=TOKEN).token == TOKEN
    assert TOKEN not in repr(ServeConfig(token=TOKEN))
    code, output = _run_cli(["--host", "0.0.0.0", "--eval"], {"MEDEYES_SERVE_TOKEN": None})
    assert code == 2
    assert "is not a loopback address and no token is set" in output


def test_a_named_token_variable_must_be_set():
    code, output = _run_cli(["--token-env", "MEDEYES_NO_SUCH_VAR"], {"MEDEYES_NO_SUCH_VAR": None})
    assert code == 2
    assert "--token-env MEDEYES_NO_SUCH_VAR: the variable is not set" in output
    code, output = _run_cli([], {"MEDEYES_SERVE_TOKEN": ""})
    assert code == 2
    assert "$MEDEYES_SERVE_TOKEN is set but empty" in output
    code, output = _run_cli([], {"MEDEYES_SERVE_TOKEN": "shorty"})
    assert code == 2
    assert "token: String should have at least 8 characters" in output
    assert "shorty" not in output  # the value is not echoed


# -- 11: opaque case ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id", ["MedEyes/Phantom-v0", "MedEyes/Samples-v0"])
def test_case_ids_are_opaque_without_eval(env_id):
    frames = []
    for _ in range(2):
        with background_server(ServeConfig(port=0, env_id=env_id)) as base, connect(ws_url(base), max_size=None) as ws:
            for index in (0, 1, 0):
                ws.send(json.dumps({"type": "reset", "data": {"case_index": index}}))
                frames.append(json.loads(ws.recv(timeout=30))["data"]["observation"]["case_id"])
            ws.send(json.dumps({"type": "state"}))
            state = json.loads(ws.recv(timeout=30))["data"]
            ws.send(json.dumps({"type": "reset", "data": {"case_index": True}}))  # a bool is not an index
            assert (
                json.loads(ws.recv(timeout=30))["data"]["message"] == "case_index must be a non-negative int, got True"
            )
    first, other = frames[:3], frames[3:]
    assert all(re.fullmatch(r"case-[0-9a-f]{20}", case_id) for case_id in frames), frames
    assert first[0] == first[2] != first[1]  # stable within a server: episodes of a case group together
    assert set(first).isdisjoint(other)  # a key per server: ids do not carry over
    assert state["case_id"] == other[2]
    eval_config = ServeConfig(port=0, env_id=env_id, include_gold=True)
    with background_server(eval_config) as base, connect(ws_url(base), max_size=None) as ws:
        ws.send(json.dumps({"type": "reset", "data": {"case_index": 0}}))
        assert not json.loads(ws.recv(timeout=30))["data"]["observation"]["case_id"].startswith("case-")


# -- 12: paths, slow headers, silent sockets, connection cap ---------------------------------------------


def _dataset(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir(parents=True)
    Image.new("L", (64, 48), 128).save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "b.png").write_bytes(b"not a png")
    row = {"id": "ok", "image": "img/a.png", "question": "Is there a nodule?", "answer": "yes", "answer_type": "closed"}
    lines = [json.dumps(row), json.dumps({**row, "id": "bad", "image": "img/b.png"})]
    (tmp_path / "cases.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_error_frames_hold_no_server_paths_or_settings(tmp_path, monkeypatch):
    import medeyes_env.serving.server as server_module

    data = _dataset(tmp_path / "private-data")
    config = ServeConfig(port=0, env_kwargs={"source": f"jsonl:{data}/cases.jsonl", "split": "test"}, token=TOKEN)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with background_server(config) as base:
        with connect(ws_url(base), additional_headers=headers) as ws:
            ws.send(json.dumps({"type": "reset", "data": {"case_index": 1}}))
            bad_image = json.loads(ws.recv(timeout=30))["data"]
        shutil.rmtree(data)  # sessions share the source opened at start-up: the next one finds its images gone
        with connect(ws_url(base), additional_headers=headers) as ws:
            ws.send(json.dumps({"type": "reset", "data": {"case_index": 0}}))
            missing = json.loads(ws.recv(timeout=30))["data"]
        real_make_env = server_module.make_env
        # a session that opens its own source now cannot build its environment
        monkeypatch.setattr(server_module, "make_env", lambda config, source=None: real_make_env(config))
        with connect(ws_url(base), additional_headers=headers) as ws:
            no_factory = ws.recv(timeout=30)
    assert bad_image == {
        "message": "cannot read image <server path>: cannot identify image file '<server path>'",
        "code": "EXECUTION_ERROR",
    }
    assert missing["code"] == "EXECUTION_ERROR" and "<server path>" in missing["message"]
    assert str(tmp_path) not in json.dumps(missing)
    assert str(tmp_path) not in no_factory and TOKEN not in no_factory and "ServeConfig" not in no_factory
    assert json.loads(no_factory)["data"]["code"] == "FACTORY_ERROR"


def test_partial_headers_are_cut_off_and_connections_are_capped():
    config = ServeConfig(port=0, max_sessions=2, max_connections=4, handshake_timeout_s=0.5)
    with background_server(config) as base:
        host, port = base.removeprefix("http://").split(":")
        slow = socket.create_connection((host, int(port)))
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # never finishes its headers
        slow.settimeout(10)
        assert slow.recv(1024) == b""  # the server closed it (before: held open without limit)
        slow.close()
        idle = [socket.create_connection((host, int(port))) for _ in range(4)]
        extra = socket.create_connection((host, int(port)))
        extra.settimeout(10)
        try:
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert extra.recv(1024) == b""  # over the cap: closed without an answer
        except ConnectionResetError:
            pass
        finally:
            for sock in (*idle, extra):
                sock.close()
        deadline = time.monotonic() + 10
        while httpx.get(base + "/health").status_code != 200:  # the cap frees up as connections close
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_a_silent_websocket_is_closed():
    config = ServeConfig(port=0, max_sessions=1, handshake_timeout_s=0.5, idle_timeout_s=2.0)
    with background_server(config) as base:
        with connect(ws_url(base)) as silent, pytest.raises(ConnectionClosed) as closed:
            silent.recv(timeout=10)  # it holds the only slot and says nothing
        assert closed.value.rcvd.code == 1008
        assert closed.value.rcvd.reason == "no message within 0.5 s of connecting"
        with connect(ws_url(base)) as ws:
            assert reset_over(ws)["type"] == "observation"  # the slot is free again
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
        assert closed.value.rcvd.reason == "no message for 2.0 s"
