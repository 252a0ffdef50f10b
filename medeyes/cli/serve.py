"""``medeyes serve``: run MedEyes as an OpenEnv server for trainers on other processes or machines."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from medeyes.cli.common import console, friendly_errors, safe
from medeyes_env.errors import ConfigError

DEFAULT_TOKEN_ENV = "MEDEYES_SERVE_TOKEN"


@friendly_errors
def serve(
    env: Annotated[str, typer.Option(help="Gymnasium id to serve: MedEyes/Phantom-v0, MedEyes/Samples-v0, ...")] = (
        "MedEyes/Phantom-v0"
    ),
    split: Annotated[str | None, typer.Option(help="train, validation or test (default: the id's own).")] = None,
    env_kwargs: Annotated[
        str, typer.Option("--env-kwargs", help="EnvConfig fields as JSON, e.g. '{\"max_steps\": 3}'.")
    ] = "{}",
    host: Annotated[
        str, typer.Option(help="Interface to bind. Anything but loopback (e.g. 0.0.0.0) needs a token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (vllm serve takes 8000).")] = 8765,
    max_sessions: Annotated[
        int, typer.Option(min=1, help="Concurrent WebSocket sessions; at least your generation batch.")
    ] = 64,
    idle_timeout: Annotated[
        float, typer.Option(min=0, help="Close sessions idle this many seconds (0: never).")
    ] = 300.0,
    max_request_bytes: Annotated[
        int, typer.Option(min=4096, help="Largest HTTP body or WebSocket frame accepted.")
    ] = 1_048_576,
    token_env: Annotated[
        str | None,
        typer.Option(
            help=f"Environment variable holding the bearer token (default ${DEFAULT_TOKEN_ENV}; unset: no token, "
            "loopback only). A variable named here must be set."
        ),
    ] = None,
    allow_origin: Annotated[
        list[str] | None,
        typer.Option(help="Origin a browser page may connect from, e.g. http://localhost:3000 (repeatable)."),
    ] = None,
    handshake_timeout: Annotated[
        float,
        typer.Option(min=0.1, max=600, help="Seconds for request headers, and for a WebSocket's first message."),
    ] = 10.0,
    max_connections: Annotated[
        int | None, typer.Option(min=1, help="Open connections at most (default: max sessions + 64).")
    ] = None,
    eval_mode: Annotated[
        bool,
        typer.Option("--eval", help="Send gold answers, gold boxes and real case ids (evaluation only)."),
    ] = False,
    timings: Annotated[
        bool,
        typer.Option(
            help="Count the seconds spent in the env's reset and step and in PNG encoding; "
            "GET /medeyes/timings serves the totals (benchmarks)."
        ),
    ] = False,
) -> None:
    """Serve MedEyes over OpenEnv's protocol: WS /ws, /reset, /step, /state, /schema, /health."""
    try:
        from medeyes_env.serving.server import ServeConfig, ignored_environment
        from medeyes_env.serving.server import serve as run_server
    except ImportError as exc:
        raise ConfigError(f'medeyes serve needs the serve extra: pip install "medeyes[serve]" ({exc})') from exc
    kwargs = _env_kwargs(env_kwargs)
    token_name, token = _token(token_env)
    for line in ignored_environment():
        console.print(safe(f"medeyes serve: {line}"), style="yellow", highlight=False)
    config = _validated(
        ServeConfig,
        env_id=env,
        split=split,
        env_kwargs=kwargs,
        host=host,
        port=port,
        max_sessions=max_sessions,
        idle_timeout_s=idle_timeout or None,
        max_request_bytes=max_request_bytes,
        token=token,
        include_gold=eval_mode,
        allow_origins=allow_origin or [],
        handshake_timeout_s=handshake_timeout,
        max_connections=max_connections,
        timings=timings,
    )
    auth = f"bearer token from ${token_name}" if token else "no token, loopback names only"
    _announce(config, auth)
    run_server(config)


def _validated(config_type: type[Any], **fields: Any) -> Any:
    """``config_type(**fields)``; a refusal names each field and its problem, never the value given."""
    try:
        return config_type(**fields)
    except ValidationError as exc:
        # Field and message only: pydantic's own text echoes the input, and the token is a secret.
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid serve settings: {problems}") from exc


def _announce(config: Any, auth: str) -> None:
    """The start-up line: what is served where, to whom, and whether gold is on the wire."""
    gold = (
        "GOLD ANSWERS AND CASE IDS ON THE WIRE (--eval)"
        if config.include_gold
        else "no gold on the wire, opaque case ids"
    )
    where = f"ws://{config.host}:{config.port}/ws"
    console.print(
        safe(f"medeyes serve: {config.env_id} on {where} ({config.max_sessions} sessions, {auth}, {gold})"),
        highlight=False,
    )


def _token(token_env: str | None) -> tuple[str, str | None]:
    """(the variable's name, the token) from the environment; fails closed on a variable named but unset or empty.

    The token comes from the environment, not a flag: flags show up in `ps` and shell history.
    """
    name = token_env or DEFAULT_TOKEN_ENV
    value = os.environ.get(name)
    if value is None and token_env is not None:
        raise ConfigError(
            f"--token-env {name}: the variable is not set; export it, or leave --token-env out to serve "
            "without a token on loopback"
        )
    if value is not None and not value.strip():
        raise ConfigError(f"${name} is set but empty; set the token, or unset the variable to serve without one")
    return name, value


def _env_kwargs(text: str) -> Any:
    """``--env-kwargs`` parsed as JSON (ServeConfig checks that it is an object of EnvConfig fields)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--env-kwargs must be a JSON object, got {text!r}: {exc}") from exc
