"""The trainer's ``vllm serve`` is the one it started: an impostor on the port, a server that ignores the run's key,
an ``http_proxy`` and a junk ``/version`` are refused or bypassed (no vLLM needed: ``vllm_stand_in.py`` plays it)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from openai_stand_in import Reply, Request, StartServer

from medeyes.agents.backends.openai import OpenAIBackend, ServerResponseError
from medeyes.agents.backends.vllm_server import EngineIdentityError, VLLMServer, free_port
from medeyes.agents.backends.vllm_weights import check_server_reload, server_version, sync_server
from medeyes_env.errors import ConfigError

STAND_IN = Path(__file__).with_name("vllm_stand_in.py")


def _launcher(tmp_path: Path, body: str) -> str:
    """An executable to pass as ``VLLMServer(python=...)``: it receives the ``-m vllm...`` command line."""
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def _stand_in(tmp_path: Path) -> str:
    return _launcher(tmp_path, f'exec {shlex.quote(sys.executable)} {shlex.quote(str(STAND_IN))} "$@"')


def _impostor(request: Request) -> Reply:
    """Everything a weight sync checks, answered right; it even refuses a request without a key."""
    if request.path.startswith("/v1") and "Authorization" not in request.headers:
        return 401, b'{"error": "Unauthorized"}'
    if request.path == "/version":
        return 200, b'{"version": "0.32.0"}'
    if request.path == "/v1/models":
        return 200, b'{"data": [{"id": "medeyes-policy"}]}'
    return 200, b'{"results": [null]}'


def test_the_server_this_process_started_is_verified_and_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")  # a dead proxy: loopback never uses it
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with VLLMServer(tmp_path, python=_stand_in(tmp_path), dev_mode=True, startup_timeout_s=60) as server:
        assert server.api_key not in " ".join(server.command())  # the key travels in the environment, not argv
        server.verify()
        assert check_server_reload(server.base_url) == "0.32.0"
        assert OpenAIBackend(server.base_url, api_key=server.api_key).model == "medeyes-policy"


def test_a_server_that_bound_the_port_first_is_refused(tmp_path: Path, openai_server: StartServer):
    port = openai_server(_impostor, port=free_port()).port
    slow_vllm = _launcher(tmp_path, "exec sleep 120")  # our server, still starting when the impostor answers
    server = VLLMServer(tmp_path, python=slow_vllm, port=port, dev_mode=True, startup_timeout_s=60)
    with pytest.raises(EngineIdentityError) as info:
        server.start()  # before: started, and check_server_reload and sync_server went to the impostor
    assert f"127.0.0.1:{port}" in str(info.value) and server.process is None  # ours was stopped


def test_a_server_that_takes_any_key_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STAND_IN_ANY_KEY", "1")
    server = VLLMServer(tmp_path, python=_stand_in(tmp_path), dev_mode=True, startup_timeout_s=60)
    with pytest.raises(EngineIdentityError, match="accepted a wrong key"):
        server.start()
    assert server.process is None


def test_a_verified_server_that_dies_gets_no_more_weights(tmp_path: Path, openai_server: StartServer):
    server = VLLMServer(tmp_path, python=_stand_in(tmp_path), dev_mode=True, startup_timeout_s=60).start()
    port = server.port
    server.process.kill()  # type: ignore[union-attr]
    server.process.wait()  # type: ignore[union-attr]
    openai_server(_impostor, port=port)  # someone else takes the port over
    try:
        with pytest.raises(EngineIdentityError, match="is not running"):
            server.verify()
    finally:
        server.stop()


def test_loopback_requests_ignore_http_proxy(tmp_path: Path):
    """Through urllib's default opener a dead ``http_proxy`` broke every call to 127.0.0.1 (run in a fresh python:
    urllib reads the proxy variables once per process)."""
    code = textwrap.dedent(f"""
        import sys, threading
        sys.path.insert(0, {str(STAND_IN.parent)!r})
        from vllm_stand_in import serve
        from medeyes.agents.backends.openai import OpenAIBackend
        from medeyes.agents.backends.vllm_weights import server_version
        threading.Thread(target=serve, args=(["--port", sys.argv[1], "--served-model-name", "m"],),
                         daemon=True).start()
        import time; time.sleep(0.5)
        url = f"http://127.0.0.1:{{sys.argv[1]}}/v1"
        print(server_version(url), OpenAIBackend(url, max_retries=0).model)
    """)
    dead = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "vllm_api_key")}
    env.update(http_proxy=dead, HTTP_PROXY=dead, all_proxy=dead, ALL_PROXY=dead)
    run = subprocess.run(
        [sys.executable, "-c", code, str(free_port())], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]  # before: ConfigError: cannot reach the vLLM server ...
    assert run.stdout.split() == ["0.32.0", "m"]


@pytest.mark.parametrize("body", [b"<html>proxy login</html>", b'{"name": "vllm"}', b"[1]"])
def test_a_version_answer_that_is_not_vllms_is_a_named_error(openai_server: StartServer, body: bytes):
    root = openai_server(lambda request: (200, body)).root
    with pytest.raises(ServerResponseError) as info:
        server_version(root + "/v1")  # before: JSONDecodeError, KeyError or TypeError
    assert str(info.value).startswith(f"{root}/version answered ") and "not a vLLM server's" in str(info.value)


def test_dev_mode_binds_to_loopback_only(tmp_path: Path):
    with pytest.raises(ConfigError, match="loopback"):
        VLLMServer(tmp_path, python=sys.executable, host="0.0.0.0", dev_mode=True)
    with pytest.raises(ConfigError, match="--host"):
        VLLMServer(tmp_path, python=sys.executable, dev_mode=True, extra_args=("--host=0.0.0.0",))
    assert VLLMServer(tmp_path, python=sys.executable, host="localhost", dev_mode=True).host == "localhost"


def test_sync_server_reaches_the_stand_in(tmp_path: Path):
    """The weight-sync calls themselves go through the proxy-free loopback opener too."""
    torch = pytest.importorskip("torch")
    with VLLMServer(tmp_path, python=_stand_in(tmp_path), dev_mode=True, startup_timeout_s=60) as server:
        size = sync_server(server.base_url, torch.nn.Linear(2, 2), tmp_path / "weights")
    assert size == 6 * 4 and (tmp_path / "weights" / "model.safetensors").is_file()
