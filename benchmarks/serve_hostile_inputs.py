"""Hostile input against ``medeyes serve``: each bad frame or request, and what the server answered.

Starts a server (token, 2 sessions, 128 KiB request cap) on a loopback port, sends every bad input
``tests/test_serve.py`` asserts on, and prints a Markdown table; the last row checks it still serves.
Run: ``python benchmarks/serve_hostile_inputs.py``.
"""

from __future__ import annotations

import json

import httpx
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
        with connect(ws_url + "?session_id=nope", additional_headers=headers) as ws:
            rows.append(("WS /ws?session_id=nope", error_frame(ws.recv())))
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
    print("| input | the server's answer |\n|---|---|")
    for name, answer in rows:
        print(f"| {name} | `{answer}` |")


if __name__ == "__main__":
    main()
