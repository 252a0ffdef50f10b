"""A stand-in for ``vllm serve`` (no vLLM here): the routes and the API-key rule the trainer relies on.

Run as ``python vllm_stand_in.py -m vllm.entrypoints.openai.api_server --host H --port P ...`` (the command line
:class:`~medeyes.agents.backends.vllm_server.VLLMServer` builds, with this script in the place of the module). Like vLLM
0.32 (``vllm/entrypoints/serve/middleware/authenticate.py``), ``VLLM_API_KEY`` guards only the paths under
``/v1`` (401 ``{"error": "Unauthorized"}`` without the key), and ``/collective_rpc`` with the cache resets
exist only with ``VLLM_SERVER_DEV_MODE=1``. ``STAND_IN_ANY_KEY=1`` makes it a server that wants a key but
accepts any.
"""

from __future__ import annotations

import argparse
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def serve(argv: list[str] | None = None) -> None:
    """Listen on ``--host``/``--port`` until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default="model")
    args, _ = parser.parse_known_args(argv)
    key = os.environ.get("VLLM_API_KEY")
    any_key = os.environ.get("STAND_IN_ANY_KEY") == "1"
    dev = os.environ.get("VLLM_SERVER_DEV_MODE") == "1"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def _reply(self, status: int, body: Any) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _route(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            given = self.headers.get("Authorization")
            if self.path.startswith("/v1") and key and not (given if any_key else given == f"Bearer {key}"):
                return self._reply(401, {"error": "Unauthorized"})
            if self.path == "/health":
                return self._reply(200, {})
            if self.path == "/version":
                return self._reply(200, {"version": "0.32.0"})
            if self.path == "/v1/models":
                return self._reply(200, {"object": "list", "data": [{"id": args.served_model_name}]})
            if dev and self.path in ("/collective_rpc", "/reset_encoder_cache", "/reset_prefix_cache"):
                return self._reply(200, {"results": [None]})
            return self._reply(404, {"detail": "Not Found"})

        do_GET = do_POST = _route

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    serve()
