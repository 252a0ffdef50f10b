"""Hostile input against ``medeyes serve``: each bad frame or request, and what the server answered.

Starts a server (token, 2 sessions, 128 KiB request cap) on a loopback port and sends every bad input
``tests/test_serve.py`` asserts on; then a token-less one (2 sessions, 6 connections, 1 s handshake
deadline, ``ENABLE_WEB_INTERFACE=true`` in its environment, a dataset with an unreadable image) for the
browser, route, connection and path cases of ``tests/adversarial/test_adv_serve.py``. Prints a
Markdown table; each part's last row checks that the server still serves.
Run: ``python benchmarks/serve_hostile_inputs.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from medeyes_env.serving.server import ServeConfig, background_server
from medeyes_env.serving.wire import MAX_ACTION_CHARS

TOKEN = "s3cret-token-for-tests"
DRILL = '<reasoning>r</reasoning><action>{"name": "drill", "box": [400, 400, 600, 600]}</action>'
FRAMES = {
    "not JSON": "{this is not json",
    "unknown type": json.dumps({"type": "explode"}),
    "step before reset": json.dumps({"type": "step", "data": {"text": DRILL}}),
    "reset with an unknown argument": json.dumps({"type": "reset", "data": {"sneed": 1}}),
    "step without text": json.dumps({"type": "step", "data": {"txt": DRILL}}),
    "action text too long": json.dumps({"type": "step", "data": {"text": "x" * (MAX_ACTION_CHARS + 1)}}),
    "text not a string": json.dumps({"type": "step", "data": {"text": ["<answer>", "no"]}}),
}


def error_frame(raw: str) -> str:
    data = json.loads(raw)["data"]
    if "errors" in data:  # pydantic echoes the input back; keep the table readable
        data["errors"] = [{"loc": e["loc"], "msg": e["msg"]} for e in data["errors"]]
    return "error frame: " + json.dumps(data)


def hostile_clients(rows: list[tuple[str, str]]) -> None:
    """The token-less server: browsers, DNS rebinding, OpenEnv's other routes, slow and silent connections."""
    os.environ["ENABLE_WEB_INTERFACE"] = "true"
    data = Path(tempfile.mkdtemp(prefix="medeyes-private-"))
    (data / "img").mkdir()
    Image.new("L", (64, 48), 128).save(data / "img" / "a.png")
    (data / "img" / "b.png").write_bytes(b"not a png")
    row = {"id": "ok", "image": "img/a.png", "question": "Is there a nodule?", "answer": "yes", "answer_type": "closed"}
    (data / "cases.jsonl").write_text(
        json.dumps(row) + "\n" + json.dumps({**row, "id": "bad", "image": "img/b.png"}) + "\n"
    )
    config = ServeConfig(
        port=0,
        max_sessions=2,
        max_connections=6,
        handshake_timeout_s=1.0,
        env_kwargs={"source": f"jsonl:{data}/cases.jsonl", "split": "test"},
    )
    with background_server(config) as base:
        ws_url = base.replace("http://", "ws://") + "/ws"
        port = int(base.rsplit(":", 1)[1])
        rows.append(
            ("WS from a browser page (Origin: https://evil.example)", refused(ws_url, origin="https://evil.example"))
        )
        response = httpx.post(base + "/reset", json={}, headers={"Origin": "https://evil.example"})
        rows.append(("POST /reset with Origin: https://evil.example", f"HTTP {response.status_code} {response.text}"))
        response = httpx.post(base + "/reset", json={}, headers={"Host": f"evil.example:{port}"})
        rows.append(("POST /reset, Host: evil.example (DNS rebinding)", f"HTTP {response.status_code} {response.text}"))
        rebound = socket.create_connection(("127.0.0.1", port))
        rows.append(
            ("WS /ws, Host: evil.example (DNS rebinding)", refused(f"ws://evil.example:{port}/ws", sock=rebound))
        )
        response = httpx.post(base + "/mcp", json={"jsonrpc": "2.0", "method": "openenv/session/create", "id": 1})
        rows.append(("POST /mcp openenv/session/create", f"HTTP {response.status_code} {response.text[:90]}..."))
        rows.append(("WS /mcp", refused(base.replace("http://", "ws://") + "/mcp")))
        rows.append(("WS /ws?session_id=nope", refused(ws_url + "?session_id=nope")))
        response = httpx.get(base + "/web")
        rows.append(("GET /web with ENABLE_WEB_INTERFACE=true", f"HTTP {response.status_code} {response.text[:60]}..."))
        with connect(ws_url) as ws:
            ws.send(json.dumps({"type": "reset", "data": {"case_index": 1}}))
            rows.append(("reset on a case whose image is unreadable", error_frame(ws.recv())))
            ws.send(json.dumps({"type": "reset", "data": {"case_index": 0}}))
            case_id = json.loads(ws.recv())["data"]["observation"]["case_id"]
            rows.append(("case id of dataset row 'ok' (no --eval)", f"observation, case_id={case_id}"))
        connection_rows(rows, ws_url, port)
        time.sleep(0.5)
        health = httpx.get(base + "/health")
        rows.append(("afterwards: GET /health", f"HTTP {health.status_code} {health.text}"))
    os.environ.pop("ENABLE_WEB_INTERFACE")
    shutil.rmtree(data)


def connection_rows(rows: list[tuple[str, str]], ws_url: str, port: int) -> None:
    """Slow headers, a silent WebSocket, and one connection over the cap of 6."""
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    start = time.monotonic()
    slow.settimeout(30)
    got = slow.recv(1024)
    rows.append(("headers never finished (slowloris)", f"closed after {time.monotonic() - start:.1f} s, {got!r}"))
    slow.close()
    start = time.monotonic()
    with connect(ws_url) as silent:
        try:
            silent.recv(timeout=30)
        except ConnectionClosed as closed:
            took = time.monotonic() - start
            rows.append(
                (
                    "WS that never sends",
                    f"closed after {took:.1f} s, code {closed.rcvd.code} ({closed.rcvd.reason})",
                )
            )
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
    extra = socket.create_connection(("127.0.0.1", port))
    extra.settimeout(10)
    try:
        extra.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = f"closed, {extra.recv(1024)!r}"
    except ConnectionResetError:
        answer = "connection reset"
    rows.append(("7th connection at --max-connections 6", answer))
    for sock in (*held, extra):
        sock.close()


def refused(url: str, **kwargs: object) -> str:
    try:
        connect(url, **kwargs).close()
    except InvalidStatus as refusal:
        return f"handshake refused: HTTP {refusal.response.status_code}"
    return "ACCEPTED (a bug)"


def main() -> None:
    rows = []
    headers = {"Authorization": f"Bearer {TOKEN}"}
    config = ServeConfig(port=0, max_sessions=2, token=TOKEN, max_request_bytes=128 * 1024)
    with background_server(config) as base:
        ws_url = base.replace("http://", "ws://") + "/ws"
        with connect(ws_url, additional_headers=headers, max_size=None) as ws:
            for name, frame in FRAMES.items():
                ws.send(frame)
                rows.append((name, error_frame(ws.recv())))
            ws.send(json.dumps({"type": "reset", "data": {"seed": 0}}))
            ws.recv()
            ws.send(json.dumps({"type": "step", "data": {"text": "<answer>" + "y" * 5000 + "</answer>"}}))
            obs = json.loads(ws.recv())["data"]["observation"]
            rows.append(
                (
                    "5,000-char turn (protocol limit 4,096)",
                    f"observation, parsed_ok={obs['parsed_ok']}: {obs['text'][:80]}...",
                )
            )
            ws.send(json.dumps({"type": "step", "data": {"text": "x" * 200_000}}))
            try:
                ws.recv()
            except ConnectionClosed as closed:
                rows.append(
                    (
                        "200 kB frame (cap 131,072 bytes)",
                        f"socket closed, code {closed.rcvd.code} ({closed.rcvd.reason})",
                    )
                )
        for name, bad in (("no token", {}), ("wrong token", {"Authorization": "Bearer wrong-token-xyz"})):
            try:
                connect(ws_url, additional_headers=bad).close()
                rows.append((f"WS with {name}", "ACCEPTED (a bug)"))
            except InvalidStatus as refused:
                rows.append((f"WS with {name}", f"handshake refused: HTTP {refused.response.status_code}"))
            response = httpx.post(base + "/reset", json={}, headers=bad)
            rows.append((f"POST /reset with {name}", f"HTTP {response.status_code} {response.text}"))
        response = httpx.post(base + "/reset", content=b"{" + b" " * 140_000 + b"}", headers=headers)
        rows.append(("POST /reset, 140 kB body", f"HTTP {response.status_code} {response.text}"))
        with (
            connect(ws_url, additional_headers=headers),
            connect(ws_url, additional_headers=headers),
            connect(ws_url, additional_headers=headers) as third,
        ):
            rows.append(("3rd session at --max-sessions 2", error_frame(third.recv())))
        health = httpx.get(base + "/health")
        rows.append(("afterwards: GET /health", f"HTTP {health.status_code} {health.text}"))
    hostile_clients(rows)
    print("| input | the server's answer |\n|---|---|")
    for name, answer in rows:
        print(f"| {name} | `{answer}` |")


if __name__ == "__main__":
    main()
