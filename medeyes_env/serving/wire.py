"""What travels between ``medeyes serve`` and its clients: OpenEnv action, observation and state models.

Views travel as inline PNG data URLs (``data:image/png;base64,...``): zlib level 1 (about 5x faster
than PIL's default level 6 on a 256 px view, for a few percent more bytes), and one grey channel
when the view is grey (a third of the pixels to compress, and most medical images are grey).

Reward components travel as explicit fields: OpenEnv's clients do not hand ``metadata`` back, so
a trainer that wants ``accuracy`` or ``grounding`` reads them here. Gold answers and gold boxes
are ``None`` unless the server was started with ``--eval``.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from openenv.core.env_server.types import Action, Observation, State
from PIL import Image
from pydantic import Field

from medeyes_env.cases import Box, open_image
from medeyes_env.errors import ImageLoadError

DATA_URL_PREFIX = "data:image/png;base64,"
MAX_ACTION_CHARS = 65_536
"""Longest action text the wire model accepts; longer is a validation error, never a crash.

The environment's own protocol limit (``ProtocolLimits.max_chars``, 4,096 by default) is lower:
text between the two reaches the environment and comes back as a malformed turn, as in-process.
"""


class MedEyesAction(Action):
    """One model turn: the text of the ``<reasoning>``/``<action>``/``<answer>`` protocol."""

    text: str = Field(
        max_length=MAX_ACTION_CHARS,
        description='One model turn, e.g. \'<reasoning>...</reasoning><action>{"name": "drill", '
        '"box": [x1, y1, x2, y2]}</action>\'. Boxes are xyxy pixels of the original image.',
    )


class MedEyesObservation(Observation):
    """The view, its text, and every reward component of the episode so far."""

    image: str = Field(description="The current view as a PNG data URL (RGB, or L when the view is grey).")
    text: str = Field(description="The question at reset; a <feedback> message after each turn.")
    question: str = Field(description="The case's question with its answer instructions (same at every step).")
    system_prompt: str = Field(default="", description="The protocol as the model is told it ('' if none).")
    case_id: str = Field(description="Id of the case, unique within its source.")
    image_size: tuple[int, int] = Field(description="(width, height) of the ORIGINAL image: boxes are in its pixels.")
    step: int = Field(default=0, description="Turns taken so far in this episode.")
    terminated: bool = Field(default=False, description="The agent answered.")
    truncated: bool = Field(default=False, description="The turn budget ran out without an answer.")
    parsed_ok: bool | None = Field(default=None, description="Whether the last turn parsed (None at reset).")
    error: str | None = Field(default=None, description="Why the last turn did not parse, if it did not.")
    reward_total: float | None = Field(default=None, description="The weighted episode reward so far.")
    accuracy: float | None = Field(default=None, description="Reward component: the answer matches gold.")
    grammar: float | None = Field(default=None, description="Reward component: every turn was well formed.")
    diversity: float | None = Field(default=None, description="Reward component: the explored regions differ.")
    grounding: float | None = Field(default=None, description="Reward component: best IoU of the boxes vs gold.")
    tool: float | None = Field(default=None, description="Reward component: DeepEyes-style tool bonus.")
    token_recall: float | None = Field(default=None, description="Metric: gold answer tokens in the answer.")
    best_iou: float | None = Field(default=None, description="Metric: best IoU of any explored box vs gold.")
    gold_answer: str | None = Field(default=None, description="Gold answer; only on a server started with --eval.")
    gold_boxes: list[Box] | None = Field(default=None, description="Gold boxes; only on a server started with --eval.")

    def components(self) -> dict[str, float]:
        """The reward components and metrics that are set, as ``info["reward_components"]`` has them."""
        names = ("accuracy", "grammar", "diversity", "grounding", "tool", "token_recall", "best_iou")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def pixels(self) -> np.ndarray:
        """The view as a ``uint8`` RGB array, as the in-process environment returns it."""
        return np.asarray(decode_image(self.image).convert("RGB"), dtype=np.uint8)


class MedEyesState(State):
    """Where a session's episode stands."""

    case_id: str | None = Field(default=None, description="Id of the current case (None before reset).")
    done: bool = Field(default=False, description="The episode has ended.")
    reward_total: float | None = Field(default=None, description="The weighted episode reward so far.")


def encode_image(pixels: np.ndarray | Image.Image) -> str:
    """Encode a view as a PNG data URL: compress level 1, one channel when grey.

    >>> url = encode_image(np.full((4, 4, 3), 7, dtype=np.uint8))
    >>> url.startswith(DATA_URL_PREFIX), decode_image(url).mode
    (True, 'L')
    """
    image = pixels if isinstance(pixels, Image.Image) else _to_image(np.asarray(pixels))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return DATA_URL_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data_url: str) -> Image.Image:
    """Decode a PNG data URL made by :func:`encode_image` (or any PNG data URL).

    Raises ``ValueError`` naming what is wrong when the text is not a PNG data URL.
    """
    if not isinstance(data_url, str) or not data_url.startswith(DATA_URL_PREFIX):
        head = data_url[:32] if isinstance(data_url, str) else type(data_url).__name__
        raise ValueError(f"expected a PNG data URL starting with {DATA_URL_PREFIX!r}, got {head!r}")
    try:
        raw = base64.b64decode(data_url[len(DATA_URL_PREFIX) :], validate=True)
    except binascii.Error as exc:
        raise ValueError(f"the data URL does not hold a readable PNG: {exc}") from exc
    try:
        return open_image(io.BytesIO(raw), "the PNG of a data URL")  # size refused from the header, before decoding
    except ImageLoadError as exc:
        raise ValueError(str(exc)) from None


def _to_image(pixels: np.ndarray) -> Image.Image:
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        grey = (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
        if grey:  # the env stacks one channel three times; send it once
            return Image.fromarray(np.ascontiguousarray(pixels[..., 0], dtype=np.uint8))
        return Image.fromarray(pixels.astype(np.uint8, copy=False))
    if pixels.ndim == 2:
        return Image.fromarray(pixels.astype(np.uint8, copy=False))
    raise ValueError(f"a view must be (H, W) or (H, W, 3) uint8, got shape {pixels.shape}")
