"""``medeyes serve``: MedEyes as an OpenEnv server, built with OpenEnv's own ``create_app``.

Routes are OpenEnv's: ``WS /ws`` (one stateful episode per connection: reset, step, state, close),
and ``POST /reset``, ``POST /step``, ``GET /state``, ``GET /schema``, ``GET /health``. Plain HTTP
``/reset`` and ``/step`` are stateless upstream (each builds a fresh environment), so episodes go
over the socket.

What this module adds around ``create_app``:

- concurrent sessions (``max_sessions``, at least a generation batch) with an idle timeout;
- request size limits: HTTP bodies over ``max_request_bytes`` get 413, WebSocket frames over it
  close the socket with code 1009, action text over :data:`~medeyes_env.serving.wire.MAX_ACTION_CHARS`
  gets a validation error frame;
- an optional bearer token on every route but ``/health`` (HTTP 401; a WebSocket is refused with 403);
- no gold answers or boxes on the wire unless ``include_gold`` (``medeyes serve --eval``).
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
from openenv.core.env_server.http_server import create_app
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import ConcurrencyConfig, EnvironmentMetadata
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medeyes_env.cases import Split
from medeyes_env.env import MedEyesEnv
from medeyes_env.errors import ConfigError
from medeyes_env.registration import ENV_IDS
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
    host: str = Field(default="127.0.0.1", description="Interface to bind; 0.0.0.0 exposes it to the network.")
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
        default=None, min_length=8, description="Bearer token every request but /health must carry; None: no check."
    )
    include_gold: bool = Field(
        default=False, description="Send gold answers and boxes in observations (evaluation only)."
    )

    @model_validator(mode="after")
    def _known_env(self) -> ServeConfig:
        if self.env_id not in ENV_IDS:
            known = ", ".join(sorted(ENV_IDS))
            raise ValueError(f"env_id {self.env_id!r} is not a MedEyes id; use one of: {known}")
        return self


class MedEyesOpenEnv(Environment[MedEyesAction, MedEyesObservation, MedEyesState]):
    """One MedEyes episode per session, behind OpenEnv's ``Environment`` API.

    ``reset(seed=..., case_index=...)`` and ``step(MedEyesAction(text=...))`` call the Gymnasium
    environment with the same arguments, so a seed gives the same episode and the same rewards
    as in-process.
    """

    SUPPORTS_CONCURRENT_SESSIONS = True  # each session owns its own MedEyesEnv; nothing is shared

    def __init__(self, config: ServeConfig | None = None) -> None:
        super().__init__()
        self.config = config or ServeConfig()
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
        if case_index is not None and (not isinstance(case_index, int) or case_index < 0):
            raise ValueError(f"case_index must be a non-negative int, got {case_index!r}")
        options = {"case_index": case_index} if case_index is not None else None
        obs, info = self.env.reset(seed=seed, options=options)
        self._question = obs["text"]  # at reset the text is the question with its answer instructions
        self._state = MedEyesState(episode_id=episode_id, step_count=0, case_id=info["case_id"])
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
            case_id=info["case_id"],
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


def build_app(config: ServeConfig | None = None) -> Any:
    """The FastAPI app: OpenEnv's ``create_app`` wrapped in the token and size guard."""
    config = config or ServeConfig()
    make_env(config).close()  # fail at start-up, not in the first session, on a bad env config
    app = create_app(
        functools.partial(MedEyesOpenEnv, config),
        MedEyesAction,
        MedEyesObservation,
        env_name="medeyes",
        concurrency_config=ConcurrencyConfig(
            max_concurrent_envs=config.max_sessions, session_timeout=config.idle_timeout_s
        ),
        state_cls=MedEyesState,
        mode="simulation",
    )
    app.add_middleware(RequestGuard, token=config.token, max_request_bytes=config.max_request_bytes)
    return app


def serve(config: ServeConfig) -> None:
    """Run the server until interrupted (uvicorn; frames over ``max_request_bytes`` close with 1009)."""
    import uvicorn

    uvicorn.run(
        build_app(config),
        host=config.host,
        port=config.port,
        ws_max_size=config.max_request_bytes,
        log_level="warning",
    )


class RequestGuard:
    """ASGI middleware: bearer token on every route but ``/health``, and a cap on HTTP body size.

    Pure ASGI rather than Starlette's ``BaseHTTPMiddleware`` because that one never sees WebSockets.
    """

    OPEN_PATHS = frozenset({"/health"})

    def __init__(self, app: Any, token: str | None, max_request_bytes: int) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Refuse what fails the checks; pass everything else through unchanged."""
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self.expected is not None and scope.get("path") not in self.OPEN_PATHS:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: the token is a secret
                if kind == "websocket":
                    await send({"type": "websocket.close", "code": 1008, "reason": "missing or wrong bearer token"})
                else:
                    await _json_error(send, 401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")
                return
        if kind == "http":
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_request_bytes):
                await _json_error(send, 413, f"request body over {self.max_request_bytes} bytes")
                return
            receive = _capped(receive, self.max_request_bytes)
        await self.app(scope, receive, send)


def _capped(receive: Any, limit: int) -> Any:
    """Wrap ``receive`` so a chunked body that grows past ``limit`` is cut off (no Content-Length to trust)."""
    seen = 0

    async def wrapped() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                # Starlette turns a disconnect into ClientDisconnect: the request ends, the server stays up.
                return {"type": "http.disconnect"}
        return message

    return wrapped


async def _json_error(send: Any, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def background_server(config: ServeConfig | None = None) -> Iterator[str]:
    """Run the server on a thread of this process and yield its base URL (``http://host:port``).

    For notebooks, tests and single-machine trainers; ``port=0`` picks a free port.
    """
    import uvicorn

    config = config or ServeConfig(port=0)
    server = uvicorn.Server(
        uvicorn.Config(
            build_app(config),
            host=config.host,
            port=config.port,
            ws_max_size=config.max_request_bytes,
            log_level="warning",
        )
    )
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
