"""``medeyes serve``: MedEyes as an OpenEnv server, built with OpenEnv's own ``create_fastapi_app``.

Routes are OpenEnv's: ``WS /ws`` (one stateful episode per connection: reset, step, state, close),
and ``POST /reset``, ``POST /step``, ``GET /state``, ``GET /schema``, ``GET /metadata``, ``GET /health``.
Plain HTTP ``/reset`` and ``/step`` are stateless upstream (each builds a fresh environment), so
episodes go over the socket. OpenEnv's MCP routes (``/mcp``), task routes and web interface
(``ENABLE_WEB_INTERFACE``) are not served.

What this module adds around OpenEnv's app (the checks themselves are in :mod:`.guard`):

- concurrent sessions (``max_sessions``, at least a generation batch) with an idle timeout;
- request size limits: HTTP bodies over ``max_request_bytes`` get 413, WebSocket frames over it
  close the socket with code 1009, action text over :data:`~medeyes_env.serving.wire.MAX_ACTION_CHARS`
  gets a validation error frame;
- an optional bearer token on every route but ``/health`` (HTTP 401; a WebSocket is refused with 403);
  without one the server binds to loopback only and answers only loopback ``Host`` names;
- no ``Origin`` (no browser page) unless allowed; a connection cap and deadlines for headers and messages;
- no gold answers or boxes, and opaque case ids, on the wire unless ``include_gold`` (``medeyes serve --eval``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gymnasium as gym
from openenv.core.env_server.http_server import create_fastapi_app
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import ConcurrencyConfig, EnvironmentMetadata
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medeyes_env.cases import Split
from medeyes_env.env import MedEyesEnv
from medeyes_env.errors import ConfigError
from medeyes_env.registration import ENV_IDS
from medeyes_env.serving.guard import ROUTES, RequestGuard, is_loopback, limited_h11
from medeyes_env.serving.wire import MedEyesAction, MedEyesObservation, MedEyesState, encode_image

_COMPONENTS = ("accuracy", "grammar", "diversity", "grounding", "tool", "token_recall", "best_iou")


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


class MedEyesOpenEnv(Environment[MedEyesAction, MedEyesObservation, MedEyesState]):
    """One MedEyes episode per session, behind OpenEnv's ``Environment`` API.

    ``reset(seed=..., case_index=...)`` and ``step(MedEyesAction(text=...))`` call the Gymnasium
    environment with the same arguments, so a seed gives the same episode and the same rewards
    as in-process.
    """

    SUPPORTS_CONCURRENT_SESSIONS = True  # each session owns its own MedEyesEnv; nothing is shared

    def __init__(self, config: ServeConfig | None = None, id_key: bytes | None = None) -> None:
        super().__init__()
        self.config = config or ServeConfig()
        self.id_key = id_key or secrets.token_bytes(32)
        self.env = make_env(self.config)
        self._state = MedEyesState()
        self._question = ""
        self._closed = False

    def reset(
        self,
        seed: int | None = None,
        episode_id: str | None = None,
        case_index: int | None = None,
        **kwargs: Any,
    ) -> MedEyesObservation:
        """Start an episode: the case drawn with ``seed``, or the one at ``case_index``."""
        self._check_open()
        if kwargs:
            raise ValueError(f"unknown reset arguments {sorted(kwargs)}; use seed, episode_id or case_index")
        if case_index is not None and (type(case_index) is not int or case_index < 0):  # True is not an index
            raise ValueError(f"case_index must be a non-negative int, got {case_index!r}")
        options = {"case_index": case_index} if case_index is not None else None
        obs, info = self.env.reset(seed=seed, options=options)
        self._question = obs["text"]  # at reset the text is the question with its answer instructions
        self._state = MedEyesState(episode_id=episode_id, step_count=0, case_id=self.public_id(info["case_id"]))
        return self._observation(obs, info, reward=None, terminated=False, truncated=False)

    def step(self, action: MedEyesAction, timeout_s: float | None = None, **kwargs: Any) -> MedEyesObservation:
        """Play one turn; a malformed turn is feedback, as in-process; a step after the end is an error."""
        self._check_open()
        if self._state.case_id is None:
            raise RuntimeError("no episode in this session: send reset before step")
        if self._state.done:
            raise RuntimeError("the episode has ended: send reset to start another")
        obs, reward, terminated, truncated, info = self.env.step(action.text)
        done = terminated or truncated
        self._state = self._state.model_copy(
            update={"step_count": info["step"], "done": done, "reward_total": info.get("reward_total")}
        )
        return self._observation(obs, info, reward=reward, terminated=terminated, truncated=truncated)

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

    def _observation(
        self, obs: dict[str, Any], info: dict[str, Any], *, reward: float | None, terminated: bool, truncated: bool
    ) -> MedEyesObservation:
        env: MedEyesEnv = self.env
        case = env.case
        components = info.get("reward_components", {})
        gold = self.config.include_gold
        return MedEyesObservation(
            image=encode_image(obs["image"]),
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


def make_env(config: ServeConfig) -> MedEyesEnv:
    """The Gymnasium environment one session plays (unwrapped: the server checks its own inputs)."""
    kwargs = dict(config.env_kwargs)
    if config.split is not None:
        kwargs["split"] = config.split
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
    make_env(config).close()  # fail at start-up, not in the first session, on a bad env config
    app = create_fastapi_app(
        _session_factory(config, secrets.token_bytes(32)),
        MedEyesAction,
        MedEyesObservation,
        concurrency_config=ConcurrencyConfig(
            max_concurrent_envs=config.max_sessions, session_timeout=config.idle_timeout_s
        ),
        env_name="medeyes",
        state_cls=MedEyesState,
        mode="simulation",
    )
    # OpenEnv's MCP routes make sessions the idle reaper never frees, and its task routes are not MedEyes'.
    app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) in ROUTES]
    app.add_middleware(
        RequestGuard,
        token=config.token,
        max_request_bytes=config.max_request_bytes,
        allow_origins=config.allow_origins,
        handshake_timeout_s=config.handshake_timeout_s,
        idle_timeout_s=config.idle_timeout_s,
    )
    return app


def _session_factory(config: ServeConfig, id_key: bytes) -> Callable[[], MedEyesOpenEnv]:
    # A named function: OpenEnv puts the factory's name in FACTORY_ERROR frames, and a partial's repr
    # would show the config (paths of the data).
    def medeyes_session() -> MedEyesOpenEnv:
        return MedEyesOpenEnv(config, id_key)

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
