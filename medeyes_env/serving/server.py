"""``medeyes serve``: MedEyes as an OpenEnv server, built with OpenEnv's own ``create_fastapi_app``.

Routes are OpenEnv's: ``WS /ws`` (one stateful episode per connection: reset, step, state, close),
and ``POST /reset``, ``POST /step``, ``GET /state``, ``GET /schema``, ``GET /metadata``, ``GET /health``.
Plain HTTP ``/reset`` and ``/step`` are stateless upstream (each builds a fresh environment), so
episodes go over the socket. OpenEnv's task API is served (``GET /medeyes/splits``, ``POST
/medeyes/num_tasks``, ``/medeyes/task``, ``/medeyes/task_range``; ``reset(split=..., index=...)`` picks
a case). OpenEnv's MCP routes and web interface (``ENABLE_WEB_INTERFACE``) are not: ``POST /mcp`` is
MedEyes' own stateless answer (no tools, no sessions), ``WS /mcp`` is refused.

What this module adds around OpenEnv's app (the checks themselves are in :mod:`.guard`):

- concurrent sessions (``max_sessions``, at least a generation batch) with an idle timeout, each with its own
  environment on the one case source the server opened (a GRPO group's sessions on one case render it once), and at
  most one reset per usable core at a time (:data:`RESET_SLOTS`);
- request size limits: HTTP bodies over ``max_request_bytes`` get 413, WebSocket frames over it
  close the socket with code 1009, action text over :data:`~medeyes_env.serving.wire.MAX_ACTION_CHARS`
  gets a validation error frame;
- an optional bearer token on every route but ``/health`` (HTTP 401; a WebSocket is refused with 403);
  without one the server binds to loopback only and answers only loopback ``Host`` names;
- no ``Origin`` (no browser page) unless allowed; a connection cap and deadlines for headers and messages;
- no gold answers or boxes, and opaque case ids, on the wire unless ``include_gold`` (``medeyes serve --eval``);
- a bad request argument (reset's, the task API's) is a 4xx with the reason over HTTP (OpenEnv answers 500),
  and an error frame over the socket;
- with ``timings`` (``medeyes serve --timings``, off by default), ``GET /medeyes/timings``: the seconds the
  process spent in the environment's reset and step and in PNG encoding (:class:`ServerTimings`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gymnasium as gym
from fastapi import Request
from fastapi.responses import JSONResponse
from openenv.core.env_server.http_server import create_fastapi_app
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import ConcurrencyConfig, EnvironmentMetadata
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medeyes_env.cases import Split
from medeyes_env.env import PROCEDURAL_CASES, MedEyesEnv
from medeyes_env.errors import ConfigError, MedEyesError
from medeyes_env.net import is_loopback
from medeyes_env.registration import ENV_IDS
from medeyes_env.serving.guard import APP_ROUTES, TIMINGS_ROUTE, RequestGuard, limited_h11, redact_paths
from medeyes_env.serving.wire import MedEyesAction, MedEyesObservation, MedEyesState, encode_image
from medeyes_env.sources import CaseSource

_COMPONENTS = ("accuracy", "grammar", "diversity", "grounding", "tool", "token_recall", "best_iou")
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
MAX_TASK_RANGE = 1000
"""Most task specs one ``task_range`` request returns: a procedural split has 2**31 - 1 of them."""


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


RESET_SLOTS = threading.BoundedSemaphore(_usable_cores())
"""Resets in progress at once, over all sessions: one per usable core.

A reset renders or decodes a new image (tens of milliseconds of numpy and Pillow that release the GIL); more
of them at once than there are cores only evict each other's arrays from the caches. Measured with 8-32
sessions on 2 cores (benchmarks/serve_load.py): docs/integrations.md."""


class RequestError(MedEyesError, ValueError):
    """A client's request arguments are wrong: HTTP answers ``status`` with the message, a socket an error frame."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ServeConfig(BaseModel):
    """Everything ``medeyes serve`` needs; each field is a CLI flag."""

    model_config = ConfigDict(extra="forbid")

    env_id: str = Field(default="MedEyes/Phantom-v0", description="Gymnasium id of the environment to serve.")
    split: Split | None = Field(
        default=None, description="Case split; None keeps the id's default (train for phantoms)."
    )
    env_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="EnvConfig fields passed to the environment, e.g. {'max_steps': 3}."
    )
    host: str = Field(
        default="127.0.0.1", description="Interface to bind; anything but loopback (e.g. 0.0.0.0) needs a token."
    )
    port: int = Field(default=8765, ge=0, le=65535, description="TCP port (0 picks a free one).")
    max_sessions: int = Field(
        default=64, ge=1, le=4096, description="Concurrent WebSocket sessions (at least a generation batch)."
    )
    idle_timeout_s: float | None = Field(
        default=300.0, gt=0, description="Sessions with no message for this long are closed; None: never."
    )
    max_request_bytes: int = Field(
        default=1 << 20, ge=4096, description="Largest HTTP body or WebSocket frame; larger is refused."
    )
    token: str | None = Field(
        default=None,
        min_length=8,
        repr=False,
        description="Bearer token every request but /health must carry; None: no check, loopback only.",
    )
    include_gold: bool = Field(
        default=False, description="Send gold answers, gold boxes and the real case ids (evaluation only)."
    )
    allow_origins: list[str] = Field(
        default_factory=list,
        description="Origin headers accepted (e.g. 'http://localhost:3000'); a request with any other is refused.",
    )
    handshake_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="A connection must finish its request headers, and a WebSocket send its first message, "
        "within this many seconds, or it is closed.",
    )
    max_connections: int | None = Field(
        default=None, ge=1, description="Open connections at most (HTTP and WebSocket); None: max_sessions + 64."
    )
    timings: bool = Field(
        default=False,
        description="Count the seconds spent in the env's reset and step and in PNG encoding, and serve the "
        "totals on GET /medeyes/timings (for benchmarks; costs two clock reads per call).",
    )

    @model_validator(mode="after")
    def _checked(self) -> ServeConfig:
        if self.env_id not in ENV_IDS:
            known = ", ".join(sorted(ENV_IDS))
            raise ValueError(f"env_id {self.env_id!r} is not a MedEyes id; use one of: {known}")
        if self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address and no token is set: anyone on the network could "
                "play sessions and read the images (and the gold with --eval); set a token, or bind 127.0.0.1"
            )
        if self.connection_cap < self.max_sessions:
            raise ValueError(
                f"max_connections ({self.max_connections}) is below max_sessions ({self.max_sessions}): "
                "every session holds a connection; raise max_connections"
            )
        return self

    @property
    def connection_cap(self) -> int:
        """Open connections at most: ``max_connections``, or ``max_sessions`` + 64 for HTTP beside the sockets."""
        return self.max_connections if self.max_connections is not None else self.max_sessions + 64


class ServerTimings:
    """Where a server's time goes (``medeyes serve --timings``): the env's reset and step, and PNG encoding.

    Each part keeps its calls, wall seconds (``perf_counter``) and the calling thread's CPU seconds
    (``thread_time``: a session thread waiting for the GIL is not counted). :meth:`snapshot` adds the
    process's CPU seconds over all threads, so a client takes two snapshots and divides the differences.

    >>> timings = ServerTimings()
    >>> with timings.measure("png_encode"):
    ...     pass
    >>> timings.snapshot()["parts"]["png_encode"]["calls"]
    1
    """

    PARTS = ("env_reset", "env_step", "png_encode")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = {part: [0, 0.0, 0.0] for part in self.PARTS}

    @contextlib.contextmanager
    def measure(self, part: str) -> Iterator[None]:
        """Add the time spent in the ``with`` block to ``part``."""
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            with self._lock:
                total = self._totals[part]
                total[0] += 1
                total[1] += wall
                total[2] += cpu

    def snapshot(self) -> dict[str, Any]:
        """The totals so far, the process's CPU seconds and a wall clock (``perf_counter``) reading."""
        with self._lock:
            totals = {part: list(total) for part, total in self._totals.items()}
        parts = {part: {"calls": calls, "wall_s": wall, "cpu_s": cpu} for part, (calls, wall, cpu) in totals.items()}
        return {"process_cpu_s": time.process_time(), "clock_s": time.perf_counter(), "parts": parts}


class MedEyesOpenEnv(Environment[MedEyesAction, MedEyesObservation, MedEyesState]):
    """One MedEyes episode per session, behind OpenEnv's ``Environment`` API.

    ``reset(seed=..., case_index=...)`` and ``step(MedEyesAction(text=...))`` call the Gymnasium
    environment with the same arguments, so a seed gives the same episode and the same rewards
    as in-process.
    """

    # Each session owns its MedEyesEnv; the server's sessions share one case source (sources are safe to read from
    # several threads), so the G sessions of a GRPO group on one case render it once, from the source's cache.
    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(
        self,
        config: ServeConfig | None = None,
        id_key: bytes | None = None,
        timings: ServerTimings | None = None,
        source: CaseSource | None = None,
    ) -> None:
        """One session's episode state.

        ``timings``: where to count the env's and PNG encoding's seconds (``None``: not counted); ``source``: the
        case source the server's sessions share (``None``: this session opens its own).
        """
        super().__init__()
        self.config = config or ServeConfig()
        self.id_key = id_key or secrets.token_bytes(32)
        self.timings = timings
        self.env = make_env(self.config, source)
        self.default_split: Split = self.env.split
        self._state = MedEyesState()
        self._question = ""
        self._closed = False

    def reset(
        self,
        seed: int | None = None,
        episode_id: str | None = None,
        case_index: int | None = None,
        split: str | None = None,
        index: int | None = None,
        **kwargs: Any,
    ) -> MedEyesObservation:
        """Start an episode: the case drawn with ``seed``, or the one at ``case_index`` / ``index``.

        ``index`` is OpenEnv's task-API name for ``case_index``; ``split`` picks the split for this episode
        (the server's when not given).
        """
        self._check_open()
        if kwargs:
            raise RequestError(
                f"unknown reset arguments {sorted(kwargs)}; use seed, episode_id, case_index, split or index"
            )
        if index is not None and case_index is not None:
            raise RequestError("pass the case as index or as case_index, not both")
        if seed is not None and (type(seed) is not int or seed < 0):
            raise RequestError(f"seed must be a non-negative int, got {seed!r}")
        if episode_id is not None and not isinstance(episode_id, str):
            raise RequestError(f"episode_id must be a string, got {episode_id!r}")
        self.env.split = self._split(split) if split is not None else self.default_split
        case_index = index if index is not None else case_index
        if case_index is not None:
            self._check_index(self.env.split, case_index, "case_index" if index is None else "index")
        options = {"case_index": case_index} if case_index is not None else None
        with RESET_SLOTS, self._measure("env_reset"):
            obs, info = self.env.reset(seed=seed, options=options)
        self._question = obs["text"]  # at reset the text is the question with its answer instructions
        self._state = MedEyesState(episode_id=episode_id, step_count=0, case_id=self.public_id(info["case_id"]))
        return self._observation(obs, info, reward=None, terminated=False, truncated=False)

    def step(self, action: MedEyesAction, timeout_s: float | None = None, **kwargs: Any) -> MedEyesObservation:
        """Play one turn; a malformed turn is feedback, as in-process; a step after the end is an error."""
        self._check_open()
        if self._state.case_id is None:
            # 409 over HTTP: plain POST /step has no session to continue (OpenEnv builds a fresh env per call)
            raise RequestError("no episode in this session: send reset before step", status=409)
        if self._state.done:
            raise RequestError("the episode has ended: send reset to start another", status=409)
        with self._measure("env_step"):
            obs, reward, terminated, truncated, info = self.env.step(action.text)
        done = terminated or truncated
        self._state = self._state.model_copy(
            update={"step_count": info["step"], "done": done, "reward_total": info.get("reward_total")}
        )
        return self._observation(obs, info, reward=reward, terminated=terminated, truncated=truncated)

    # -- OpenEnv's task API (discovery only; reset(split=..., index=...) plays a task) ----------------------------

    def list_splits(self) -> list[dict[str, Any]]:
        """The three splits, each with its number of tasks (``procedural``: every index is a case)."""
        return [self._split_descriptor(split) for split in SPLITS]

    def num_tasks(self, split: str) -> int:
        """Cases in ``split``: the source's count, or 2**31 - 1 for a procedural source (the indices reset draws)."""
        return self._split_descriptor(self._split(split))["num_tasks"]

    def get_task(self, split: str, index: int) -> dict[str, Any]:
        """One case as a task spec: its question and answer format, never its gold (unless ``--eval``)."""
        split = self._split(split)
        self._check_index(split, index, "index")
        case = self.env.source.case(split, index)
        spec: dict[str, Any] = {
            "split": split,
            "index": index,
            "case_id": self.public_id(case.id),
            "question": case.question,
            "answer_type": case.answer_type.value,
            "options": list(case.options),
        }
        if self.config.include_gold:
            spec |= {"gold_answer": case.answer, "gold_boxes": [region.box for region in case.regions]}
        return spec

    def get_task_range(self, split: str, start: int | None = None, stop: int | None = None) -> list[dict[str, Any]]:
        """Task specs ``start`` (inclusive) to ``stop`` (exclusive), Python-slice style, at most MAX_TASK_RANGE."""
        split = self._split(split)
        total = self.num_tasks(split)
        for name, bound in (("start", start), ("stop", stop)):
            if bound is not None and type(bound) is not int:
                raise RequestError(f"{name} must be an int or null, got {bound!r}")
        indices = range(total)[start:stop]
        if len(indices) > MAX_TASK_RANGE:
            raise RequestError(
                f"{len(indices)} tasks asked for at once; ask for at most {MAX_TASK_RANGE} (pass start and stop)"
            )
        return [self.get_task(split, index) for index in indices]

    def _split(self, split: Any) -> Split:
        if split not in SPLITS:
            raise RequestError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return split

    def _split_descriptor(self, split: Split) -> dict[str, Any]:
        size = self.env.source.size(split)
        procedural = size is None
        num_tasks = PROCEDURAL_CASES if procedural else size
        return {"name": split, "type": split, "num_tasks": num_tasks, "procedural": procedural}

    def _check_index(self, split: Split, index: Any, name: str) -> None:
        if type(index) is not int or index < 0:  # True is not an index
            raise RequestError(f"{name} must be a non-negative int, got {index!r}")
        total = self._split_descriptor(split)["num_tasks"]
        if index >= total:
            raise RequestError(f"{name} {index} is out of range: split {split!r} has {total} tasks")

    def public_id(self, case_id: str) -> str:
        """The id clients see: the case's own with ``include_gold``, else an HMAC of it under this server's key.

        Case ids name answers (``samples/<image>/<question>``) or the draw that makes a phantom, so without
        ``--eval`` they travel opaque: ``case-`` and 20 hex digits, the same for one case on one server.
        """
        if self.config.include_gold:
            return case_id
        return "case-" + hmac.new(self.id_key, case_id.encode(), hashlib.sha256).hexdigest()[:20]

    @property
    def state(self) -> MedEyesState:
        """Where this session's episode stands."""
        return self._state

    def get_metadata(self) -> EnvironmentMetadata:
        """Name, description and version, for ``GET /metadata``."""
        from medeyes_env import __version__

        return EnvironmentMetadata(
            name="MedEyes",
            description=f"{self.config.env_id}: scan, drill and answer on a medical image, with verifiable rewards.",
            version=__version__,
        )

    def close(self) -> None:
        """Release the Gymnasium environment (OpenEnv calls this when a session ends or idles out)."""
        self._closed = True
        self.env.close()

    def _check_open(self) -> None:
        # The idle reaper frees the session's slot but leaves its socket open; say so instead of playing on.
        if self._closed:
            raise RuntimeError(
                f"this session was closed after {self.config.idle_timeout_s} s without a message; open a new connection"
            )

    def _measure(self, part: str) -> contextlib.AbstractContextManager:
        return self.timings.measure(part) if self.timings is not None else contextlib.nullcontext()

    def _observation(
        self, obs: dict[str, Any], info: dict[str, Any], *, reward: float | None, terminated: bool, truncated: bool
    ) -> MedEyesObservation:
        env: MedEyesEnv = self.env
        case = env.case
        components = info.get("reward_components", {})
        gold = self.config.include_gold
        with self._measure("png_encode"):
            image = encode_image(obs["image"])
        return MedEyesObservation(
            image=image,
            text=obs["text"],
            question=self._question,
            system_prompt=env.system_prompt() if info["step"] == 0 else "",
            case_id=self.public_id(info["case_id"]),
            image_size=tuple(info["image_size"]),
            step=info["step"],
            terminated=terminated,
            truncated=truncated,
            parsed_ok=info.get("parsed_ok"),
            error=info.get("error"),
            reward_total=info.get("reward_total"),
            done=terminated or truncated,
            reward=reward,
            gold_answer=case.answer if gold else None,
            gold_boxes=[region.box for region in case.regions] if gold else None,
            **{name: components.get(name) for name in _COMPONENTS},
        )


def make_env(config: ServeConfig, source: CaseSource | None = None) -> MedEyesEnv:
    """The Gymnasium environment one session plays (unwrapped: the server checks its own inputs).

    ``source``: the case source the server's sessions share (``None``: the env opens its own).
    """
    kwargs = dict(config.env_kwargs)
    if config.split is not None:
        kwargs["split"] = config.split
    if source is not None:
        kwargs["source"] = source
    try:
        return gym.make(config.env_id, **kwargs).unwrapped
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build {config.env_id} with {kwargs}: {exc}") from exc


IGNORED_VARIABLES = {
    "ENABLE_WEB_INTERFACE": "OpenEnv's web interface plays one environment shared by every client",
    "OPENENV_MODE": "the mode is always simulation (reset and step over the socket)",
}


def ignored_environment() -> list[str]:
    """One line for each OpenEnv environment variable that is set here and that ``medeyes serve`` ignores."""
    set_here = [name for name in IGNORED_VARIABLES if os.environ.get(name)]
    return [f"{name}={os.environ[name]} is ignored: {IGNORED_VARIABLES[name]}" for name in set_here]


def build_app(config: ServeConfig | None = None) -> Any:
    """The FastAPI app: OpenEnv's ``create_fastapi_app`` with :data:`~.guard.ROUTES` only, behind the guard.

    ``create_fastapi_app`` rather than ``create_app``: the latter reads ``ENABLE_WEB_INTERFACE`` and then
    serves ``/web`` routes on one environment that every client shares.
    """
    config = config or ServeConfig()
    probe = make_env(config)  # fail at start-up, not in the first session, on a bad env config
    probe.close()
    timings = ServerTimings() if config.timings else None
    app = create_fastapi_app(
        _session_factory(config, secrets.token_bytes(32), timings, probe.source),
        MedEyesAction,
        MedEyesObservation,
        concurrency_config=ConcurrencyConfig(
            max_concurrent_envs=config.max_sessions, session_timeout=config.idle_timeout_s
        ),
        env_name="medeyes",
        state_cls=MedEyesState,
        mode="simulation",
    )
    # OpenEnv's MCP routes make sessions the idle reaper never frees; its list_tasks route would list 2**31 tasks.
    app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) in APP_ROUTES]
    app.add_api_route("/mcp", mcp_without_tools, methods=["POST"], include_in_schema=False)
    if timings is not None:
        app.add_api_route(TIMINGS_ROUTE, timings.snapshot, methods=["GET"], include_in_schema=False)
    app.add_exception_handler(RequestError, _request_error_response)
    app.add_middleware(
        RequestGuard,
        token=config.token,
        max_request_bytes=config.max_request_bytes,
        allow_origins=config.allow_origins,
        handshake_timeout_s=config.handshake_timeout_s,
        idle_timeout_s=config.idle_timeout_s,
    )
    return app


async def mcp_without_tools(request: Request) -> dict[str, Any]:
    """``POST /mcp``: a JSON-RPC 2.0 answer that MedEyes has no MCP tools, with no session behind it.

    MedEyes is a simulation-mode environment (its actions are protocol text over ``/ws``), so ``tools/list``
    is empty and every other method is "not found". OpenEnv's own ``/mcp`` made sessions the idle reaper
    never freed; this one holds nothing. OpenEnv's runtime validator expects the route to answer JSON-RPC.
    """
    try:
        message = json.loads(await request.body())
    except ValueError:
        return {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}}
    if not isinstance(message, dict) or not isinstance(message.get("method"), str):
        return {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Invalid Request: no method"}}
    request_id = message.get("id")
    if message["method"] == "tools/list":
        return {"jsonrpc": "2.0", "id": request_id, "result": {"tools": []}}
    error = f"Method not found: {message['method'][:100]}. medeyes serve has no MCP tools; play over WS /ws"
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": error}}


def _request_error_response(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse({"detail": redact_paths(str(exc))}, status_code=exc.status)


def _session_factory(
    config: ServeConfig, id_key: bytes, timings: ServerTimings | None, source: CaseSource
) -> Callable[[], MedEyesOpenEnv]:
    # A named function: OpenEnv puts the factory's name in FACTORY_ERROR frames, and a partial's repr
    # would show the config (paths of the data).
    def medeyes_session() -> MedEyesOpenEnv:
        return MedEyesOpenEnv(config, id_key, timings, source)

    return medeyes_session


def uvicorn_config(config: ServeConfig) -> Any:
    """The uvicorn settings for ``config``: the app, the frame limit, the connection cap and header deadline."""
    import uvicorn

    return uvicorn.Config(
        build_app(config),
        host=config.host,
        port=config.port,
        http=limited_h11(config.connection_cap, config.handshake_timeout_s),
        ws_max_size=config.max_request_bytes,
        log_level="warning",
    )


def serve(config: ServeConfig) -> None:
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.Server(uvicorn_config(config)).run()


@contextlib.contextmanager
def background_server(config: ServeConfig | None = None) -> Iterator[str]:
    """Run the server on a thread of this process and yield its base URL (``http://host:port``).

    For notebooks, tests and single-machine trainers; ``port=0`` picks a free port.
    """
    import uvicorn

    config = config or ServeConfig(port=0)
    server = uvicorn.Server(uvicorn_config(config))
    thread = threading.Thread(target=server.run, name="medeyes-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"medeyes serve did not start on {config.host}:{config.port}")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]  # the real port when config.port is 0
    try:
        yield f"http://{config.host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
