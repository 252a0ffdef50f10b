"""``MedEyesClient``: OpenEnv's ``EnvClient`` for a ``medeyes serve`` server, async and sync.

>>> async def play(url: str) -> float:  # doctest: +SKIP
...     async with MedEyesClient(base_url=url) as env:
...         result = await env.reset(seed=0)
...         result = await env.step("<reasoning>looks clear</reasoning><answer>no</answer>")
...         return result.reward

Sync: ``with MedEyesClient(base_url=url).sync() as env: env.reset(seed=0)``. Each client is one
session (one WebSocket, one episode at a time) on the server.
"""

from __future__ import annotations

from typing import Any

from openenv.core.client_types import StepResult
from openenv.core.env_client import EnvClient

from medeyes_env.serving.wire import MedEyesAction, MedEyesObservation, MedEyesState


class MedEyesClient(EnvClient[MedEyesAction, MedEyesObservation, MedEyesState]):
    """One MedEyes session over OpenEnv's WebSocket protocol.

    ``step`` takes a :class:`MedEyesAction` or the turn's text. ``token`` sends
    ``Authorization: Bearer <token>`` for a server started with ``--token``.
    """

    def __init__(self, base_url: str, token: str | None = None, **kwargs: Any) -> None:
        headers = dict(kwargs.pop("headers", None) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        super().__init__(base_url=base_url, headers=headers or None, **kwargs)

    def _step_payload(self, action: MedEyesAction | str) -> dict[str, Any]:
        if isinstance(action, str):
            action = MedEyesAction(text=action)
        if not isinstance(action, MedEyesAction):
            raise TypeError(f"step takes a MedEyesAction or the turn's text, got {type(action).__name__}")
        return action.model_dump(exclude={"metadata"})

    def _parse_result(self, payload: dict[str, Any]) -> StepResult[MedEyesObservation]:
        fields = dict(payload.get("observation") or {})
        fields.pop("metadata", None)
        observation = MedEyesObservation(**fields, reward=payload.get("reward"), done=bool(payload.get("done")))
        return StepResult(observation=observation, reward=payload.get("reward"), done=bool(payload.get("done")))

    def _parse_state(self, payload: dict[str, Any]) -> MedEyesState:
        return MedEyesState(**payload)
