"""A stand-in for an OpenAI-compatible server (``vllm serve``) on 127.0.0.1, in this process, stdlib only.

It stands in for a real server only where the point is OUR client's handling of what a server does: the
requests it builds, how it parses answers, and how it survives 5xx, dropped connections, junk, silence and
impostors. Start one through the ``openai_server`` fixture (tests/conftest.py), which closes it after the test;
the same clients against a real ``vllm serve`` are tested in tests/test_vllm_serving.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Request:
    """One request the server received: ``payload`` is the JSON body (None when empty, the text if not JSON)."""

    method: str
    path: str
    payload: Any
    headers: dict[str, str] = field(default_factory=dict)


Reply = tuple[int, bytes] | None
"""``(status, body)``; None closes the connection without answering (a dropped connection)."""
Responder = Callable[[Request], Reply]


def completion(content: str, token_ids: list[int] | None = None, finish: str = "stop", **choice: Any) -> bytes:
    """A vLLM chat completion of ``content``: token ids (default 1..len) with their log-probabilities."""
    ids = token_ids if token_ids is not None else list(range(1, len(content) + 1))
    entries = [{"token": f"token_id:{t}", "logprob": -0.1 * (k + 1)} for k, t in enumerate(ids)]
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "tiny",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish,
                "token_ids": ids,
                "logprobs": {"content": entries},
                **choice,
            }
        ],
    }
    return json.dumps(body).encode()


def _payload(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


class StandInServer:
    """A ThreadingHTTPServer whose answers come from ``respond(request)``; it records every request.

    ``delay_s`` holds each request that long before answering (``max_in_flight`` counts how many overlapped);
    ``port`` 0 picks a free one. ``base_url`` is the ``/v1`` root a client is given, ``root`` the server's.
    """

    def __init__(self, respond: Responder, delay_s: float = 0.0, port: int = 0) -> None:
        self.respond = respond
        self.delay_s = delay_s
        self.requests: list[Request] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest's output clean
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(self.command, self.path, _payload(self.rfile.read(length)), dict(self.headers))
                with stand_in.lock:
                    stand_in.requests.append(request)
                    stand_in.in_flight += 1
                    stand_in.max_in_flight = max(stand_in.max_in_flight, stand_in.in_flight)
                if stand_in.delay_s:
                    time.sleep(stand_in.delay_s)
                with stand_in.lock:
                    stand_in.in_flight -= 1
                reply = stand_in.respond(request)
                if reply is None:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                status, body = reply
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _handle

        class Server(ThreadingHTTPServer):
            request_queue_size = 64  # the default 5 drops simultaneous connects (the client retries after 1 s)

        self.server = Server(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.root = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.root}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def chat_payloads(self) -> list[Any]:
        """The JSON bodies of the chat completion requests, in arrival order."""
        return [r.payload for r in self.requests if r.path == "/v1/chat/completions"]


StartServer = Callable[..., StandInServer]
"""What the ``openai_server`` fixture gives: ``start(respond, delay_s=0.0, port=0) -> StandInServer``."""
