"""``medeyes serve``: run MedEyes as an OpenEnv server for trainers on other processes or machines."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from medeyes.cli.common import console, friendly_errors, safe
from medeyes_env.errors import ConfigError


@friendly_errors
def serve(
    env: Annotated[str, typer.Option(help="Gymnasium id to serve: MedEyes/Phantom-v0, MedEyes/Samples-v0, ...")] = (
        "MedEyes/Phantom-v0"
    ),
    split: Annotated[str | None, typer.Option(help="train, validation or test (default: the id's own).")] = None,
    env_kwargs: Annotated[
        str, typer.Option("--env-kwargs", help="EnvConfig fields as JSON, e.g. '{\"max_steps\": 3}'.")
    ] = "{}",
    host: Annotated[str, typer.Option(help="Interface to bind. 0.0.0.0 exposes the server to the network.")] = (
        "127.0.0.1"
    ),
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
        str,
        typer.Option(help="Name of the environment variable holding a bearer token; unset or empty: no token check."),
    ] = "MEDEYES_SERVE_TOKEN",
    eval_mode: Annotated[
        bool, typer.Option("--eval", help="Send gold answers and gold boxes in observations (evaluation only).")
    ] = False,
) -> None:
    """Serve MedEyes over OpenEnv's protocol: WS /ws, /reset, /step, /state, /schema, /health."""
    try:
        from medeyes_env.serving.server import ServeConfig
        from medeyes_env.serving.server import serve as run_server
    except ImportError as exc:
        raise ConfigError(f'medeyes serve needs the serve extra: pip install "medeyes[serve]" ({exc})') from exc
    kwargs = _env_kwargs(env_kwargs)
    # The token comes from the environment, not a flag: flags show up in `ps` and shell history.
    token = os.environ.get(token_env) or None
    try:
        config = ServeConfig(
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
        )
    except ValidationError as exc:
        raise ConfigError(f"invalid serve settings: {exc}") from exc
    auth = f"bearer token from ${token_env}" if token else "no token"
    gold = "GOLD ANSWERS ON THE WIRE (--eval)" if eval_mode else "no gold on the wire"
    console.print(
        safe(f"medeyes serve: {env} on ws://{host}:{port}/ws ({max_sessions} sessions, {auth}, {gold})"),
        highlight=False,
    )
    run_server(config)


def _env_kwargs(text: str) -> Any:
    """``--env-kwargs`` parsed as JSON (ServeConfig checks that it is an object of EnvConfig fields)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--env-kwargs must be a JSON object, got {text!r}: {exc}") from exc
