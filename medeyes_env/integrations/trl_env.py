"""MedEyes as a TRL ``environment_factory``: the tools ``scan``, ``drill`` and ``answer`` return images.

>>> from trl import GRPOTrainer  # doctest: +SKIP
>>> trainer = GRPOTrainer(model=..., environment_factory=MedEyesToolEnv, train_dataset=rows, ...)  # doctest: +SKIP

TRL makes one instance per rollout, calls ``reset(**row)`` with the dataset row (its ``seed`` or
``case_index`` pick the case) and appends what it returns, the overview image and the question, to
the prompt. Every public method but ``reset`` and ``get_reward`` is a tool, described to the model
by its signature and docstring; each returns ``[image, text]`` content, so the view a tool shows
reaches the model and the loss as an image (TRL's ``rollout_func`` path drops later-turn images;
``environment_factory`` keeps them).

The tags of MedEyes' text protocol are written by this adapter, not the model: a tool call becomes
``<reasoning>...</reasoning><action>{...}</action>``. The ``grammar`` reward would then measure the
adapter, so it is off here (weight 0; the other paper weights stay: ``0.7 accuracy + 0.1 diversity``).
A tool call with unusable arguments (a box outside the image, three numbers) is still a malformed
turn: the tool answers with the environment's feedback and the turn counts, as in-process.

``MedEyesToolEnv(url="http://host:8000")`` plays on a ``medeyes serve`` server instead (the
``serve`` extra); its rewards are the server's weights (start it with
``--env-kwargs '{"rewards": {"grammar": 0.0}}'`` for the same neutrality).
"""

from __future__ import annotations

import json
from typing import Any

from PIL import Image

from medeyes_env.env import MedEyesEnv
from medeyes_env.registration import ENV_IDS
from medeyes_env.rewards import RewardConfig

NO_GRAMMAR = RewardConfig(grammar=0.0)
"""The paper's weights without ``grammar``: tags written by the adapter say nothing about the model."""

Content = list[dict[str, Any]]


class MedEyesToolEnv:
    """One MedEyes episode per rollout, with ``scan``, ``drill`` and ``answer`` as tools.

    ``env_id`` and ``env_kwargs`` pick the local environment (``EnvConfig`` fields; ``rewards``
    defaults to :data:`NO_GRAMMAR`); ``url`` (and ``token``) play on a ``medeyes serve`` server instead.
    """

    def __init__(
        self,
        env_id: str = "MedEyes/Phantom-v0",
        *,
        url: str | None = None,
        token: str | None = None,
        split: str | None = None,
        **env_kwargs: Any,
    ) -> None:
        if url is not None:
            self._backend: _Local | _Remote = _Remote(url, token)
        else:
            if env_id not in ENV_IDS:
                raise ValueError(f"env_id {env_id!r} is not a MedEyes id; use one of: {', '.join(sorted(ENV_IDS))}")
            kwargs = {**ENV_IDS[env_id], **({"split": split} if split else {})}
            env_kwargs.setdefault("rewards", NO_GRAMMAR)
            self._backend = _Local(MedEyesEnv(**kwargs, **env_kwargs))
        self._reward = 0.0
        self._done = True
        self.components: dict[str, float] = {}
        self.turns = 0

    def reset(self, **row: Any) -> Content:
        """Start the episode the row names (``seed`` or ``case_index``); return the overview and question."""
        seed, index = row.get("seed"), row.get("case_index")
        image, text = self._backend.reset(
            seed=int(seed) if seed is not None else None, case_index=int(index) if index is not None else None
        )
        self._reward, self._done, self.components, self.turns = 0.0, False, {}, 0
        return [_image(image), _text(text + "\nUse the scan, drill and answer tools; boxes are [x1, y1, x2, y2].")]

    def scan(self, boxes: list[list[float]]) -> Content:
        """Look at several regions at once: their zoomed crops come back side by side, numbered.

        Args:
            boxes: 1 to 5 regions, each [x1, y1, x2, y2] in pixels of the original image.

        """
        return self._play("scan", {"name": "scan", "boxes": boxes})

    def drill(self, box: list[float]) -> Content:
        """Zoom into one region at full resolution.

        Args:
            box: The region [x1, y1, x2, y2] in pixels of the original image.

        """
        return self._play("drill", {"name": "drill", "box": box})

    def answer(self, text: str) -> Content:
        """Give the final answer; this ends the episode.

        Args:
            text: The answer, e.g. "yes", "no", an option's letter or a short phrase.

        """
        return self._play("answer", str(text))

    def get_reward(self) -> float:
        """The episode's reward (0.0 until it ends: a rollout that never answers earns nothing)."""
        return self._reward

    def _play(self, tool: str, payload: Any) -> Content:
        if self._done:
            return [_text("The episode has ended; no more tool calls are needed.")]
        if tool == "answer":
            turn = f"<reasoning>answer tool call</reasoning><answer>{payload}</answer>"
        else:  # the arguments go to the env as the model gave them: its parser judges them, never this adapter
            turn = f"<reasoning>{tool} tool call</reasoning><action>{json.dumps(payload, default=str)}</action>"
        image, text, reward, done, components = self._backend.step(turn)
        self.turns += 1
        self.components = components
        if done:
            self._reward, self._done = reward, True
        return [_image(image), _text(text)]


class _Local:
    """The environment in this process."""

    def __init__(self, env: MedEyesEnv) -> None:
        self.env = env

    def reset(self, seed: int | None, case_index: int | None) -> tuple[Image.Image, str]:
        options = {"case_index": case_index} if case_index is not None else None
        obs, _ = self.env.reset(seed=seed, options=options)
        return Image.fromarray(obs["image"]), obs["text"]

    def step(self, turn: str) -> tuple[Image.Image, str, float, bool, dict[str, float]]:
        obs, reward, terminated, truncated, info = self.env.step(turn)
        return Image.fromarray(obs["image"]), obs["text"], reward, terminated or truncated, info["reward_components"]


class _Remote:
    """A ``medeyes serve`` session (one WebSocket per rollout)."""

    def __init__(self, url: str, token: str | None) -> None:
        from medeyes_env.serving.client import MedEyesClient  # the serve extra, only when a URL is given

        self.client = MedEyesClient(url, token=token).sync()

    def reset(self, seed: int | None, case_index: int | None) -> tuple[Image.Image, str]:
        kwargs = {k: v for k, v in {"seed": seed, "case_index": case_index}.items() if v is not None}
        obs = self.client.reset(**kwargs).observation
        return _decoded(obs.image), obs.text

    def step(self, turn: str) -> tuple[Image.Image, str, float, bool, dict[str, float]]:
        result = self.client.step(turn)
        obs = result.observation
        return _decoded(obs.image), obs.text, float(result.reward or 0.0), result.done, obs.components()


def _decoded(data_url: str) -> Image.Image:
    from medeyes_env.serving.wire import decode_image

    return decode_image(data_url).convert("RGB")


def _image(image: Image.Image) -> dict[str, Any]:
    return {"type": "image", "image": image}


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}
