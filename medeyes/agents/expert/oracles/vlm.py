"""The VLM oracle: any OpenAI-compatible chat endpoint (``vllm serve``) asked to locate and to judge regions."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medeyes.agents.expert.oracles.base import ScoredRegion, clip01
from medeyes_env.cases import Box, Case
from medeyes_env.views import clamp_box

SCAN_PROMPT = (
    "Please locate all abnormal regions in this image. The image is {width} x {height} pixels. "
    'Reply with JSON only: a list of objects {{"box": [x1, y1, x2, y2], "confidence": c}} with pixel '
    "coordinates (origin top-left) and c between 0 and 1, at most {max_regions} objects, [] if there is none. "
    "Question being investigated: {question}"
)
DRILL_PROMPT = "Is any abnormality in this region? Answer yes or no. Question being investigated: {question}"
READ_PROMPT = "{question}\n{options}Answer with the answer only."


class VLMOracleConfig(BaseModel):
    """How the VLM oracle talks to an OpenAI-compatible server (e.g. ``vllm serve``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(default="http://127.0.0.1:8000/v1", description="Server URL up to and including /v1.")
    model: str | None = Field(default=None, description="Served model name; None asks the server's /models.")
    api_key: str | None = Field(default=None, description="Bearer token, if the server wants one.")
    timeout_s: float = Field(default=60.0, gt=0.0, description="Seconds to wait for one reply.")
    vllm_extensions: bool = Field(
        default=True, description="Send vLLM's extra request fields; False for a strict OpenAI server."
    )
    image_side: int = Field(default=448, ge=32, description="Longest side of images sent to the model.")
    max_regions: int = Field(default=5, ge=1, description="Most regions asked for in a scan (paper: 5).")
    scan_max_tokens: int = Field(default=256, ge=8, description="Token cap of a scan reply.")
    top_logprobs: int = Field(default=20, ge=1, le=20, description="Alternatives seen at the drill's first token.")
    scan_prompt: str = Field(
        default=SCAN_PROMPT, description="Scan prompt (paper: 'Please locate all abnormal regions')."
    )
    drill_prompt: str = Field(
        default=DRILL_PROMPT, description="Drill prompt (paper: 'Is any abnormality in this region?')."
    )
    read_facts: bool = Field(default=True, description="Ask the model questions regions cannot inform (modality...).")
    default_confidence: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Confidence of a scanned box when the model gives none."
    )

    @model_validator(mode="after")
    def _url(self) -> VLMOracleConfig:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        return self


def fit_image(image: Image.Image, side: int) -> Image.Image:
    """``image`` as RGB, scaled down so its longest side is at most ``side`` (never up)."""
    scale = min(1.0, side / max(image.size))
    sent = image.convert("RGB")
    if scale < 1.0:
        sent = sent.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    return sent


def user_message(image: Image.Image, prompt: str) -> list[dict[str, Any]]:
    """One user message with an image part and a text part (OpenAI format, PIL image)."""
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]


_JSON_LIST_RE = re.compile(r"\[.*\]", re.DOTALL)
_NUMBER = r"(-?\d+(?:\.\d+)?)"
_BOX_RE = re.compile(r"\[\s*" + r"\s*,\s*".join([_NUMBER] * 4) + r"\s*\]")


def parse_regions(
    text: str,
    sent_size: tuple[int, int],
    original_size: tuple[int, int],
    default_confidence: float = 0.5,
    max_regions: int = 5,
) -> list[ScoredRegion]:
    """Boxes (and confidences) from a model's scan reply, scaled from the sent image to the original.

    Accepts a JSON list of ``{"box": [...], "confidence": c}`` objects (``bbox``/``bbox_2d`` and
    ``score`` also read), of bare ``[x1, y1, x2, y2]`` lists, an object with a ``regions`` list,
    JSON inside a Markdown fence, or, failing JSON, any ``[a, b, c, d]`` groups in the text.
    Boxes that are empty after clamping to the image are dropped; never raises on model text.

    >>> parse_regions('[{"box": [10, 10, 20, 20], "confidence": 0.8}]', (100, 100), (200, 200))
    [ScoredRegion(box=(20.0, 20.0, 40.0, 40.0), confidence=0.8, label=None, extent=None)]
    >>> parse_regions("I see one at [0, 0, 50, 50].", (100, 100), (100, 100))
    [ScoredRegion(box=(0.0, 0.0, 50.0, 50.0), confidence=0.5, label=None, extent=None)]
    """
    items: list[Any] = []
    cleaned = re.sub(r"```[a-zA-Z]*", "", text)
    try:
        data: Any = json.loads(cleaned.strip())
    except (json.JSONDecodeError, RecursionError):
        match = _JSON_LIST_RE.search(cleaned)
        try:
            data = json.loads(match.group(0)) if match else None
        except (json.JSONDecodeError, RecursionError):
            data = None
    if isinstance(data, dict):
        data = data.get("regions", data.get("boxes", [data]))
    if isinstance(data, list):
        items = [data] if len(data) == 4 and all(isinstance(v, (int, float)) for v in data) else data
    regions = _regions_from(items, sent_size, original_size, default_confidence)
    if not regions:
        fallback = [[float(v) for v in m.groups()] for m in _BOX_RE.finditer(cleaned)]
        regions = _regions_from(fallback, sent_size, original_size, default_confidence)
    regions.sort(key=lambda r: -r.confidence)
    return regions[:max_regions]


def _regions_from(
    items: list[Any], sent_size: tuple[int, int], original_size: tuple[int, int], default_confidence: float
) -> list[ScoredRegion]:
    sx = original_size[0] / sent_size[0]
    sy = original_size[1] / sent_size[1]
    regions: list[ScoredRegion] = []
    for item in items:
        raw_box, confidence, label = None, default_confidence, None
        if isinstance(item, dict):
            raw_box = item.get("box", item.get("bbox", item.get("bbox_2d")))
            raw_conf = item.get("confidence", item.get("score"))
            if isinstance(raw_conf, (int, float)) and not isinstance(raw_conf, bool) and math.isfinite(raw_conf):
                confidence = clip01(float(raw_conf))
            label = item.get("label") if isinstance(item.get("label"), str) else None
        elif isinstance(item, list):
            raw_box = item
        if not (isinstance(raw_box, list) and len(raw_box) == 4):
            continue
        try:
            x1, y1, x2, y2 = (float(v) for v in raw_box)
        except (TypeError, ValueError):
            continue
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            continue
        box = clamp_box((x1 * sx, y1 * sy, x2 * sx, y2 * sy), original_size)
        if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
            continue
        regions.append(ScoredRegion(box, confidence, label))
    return regions


class VLMOracle:
    """A region oracle behind any OpenAI-compatible chat endpoint, through :class:`OpenAIBackend`.

    scan: one greedy generation of JSON boxes on the whole image (scaled to ``image_side``);
    drill: :func:`~medeyes.agents.backends.openai.yes_probability` on the region's full-resolution crop;
    read: one short greedy generation of the question itself.
    """

    name = "vlm"

    def __init__(self, config: VLMOracleConfig | None = None, backend: Any | None = None) -> None:
        from medeyes.agents.backends.openai import OpenAIBackend

        self.config = config or VLMOracleConfig()
        cfg = self.config
        self.backend = backend or OpenAIBackend(
            cfg.base_url,
            cfg.model,
            cfg.api_key,
            cfg.timeout_s,
            vllm_extensions=cfg.vllm_extensions,
            content_separator="",
        )

    def describe(self) -> dict[str, Any]:
        """Name, server and prompts (never the API key)."""
        return {"name": self.name, **self.config.model_dump(exclude={"api_key"})}

    def _sampling(self, max_tokens: int) -> Any:
        from medeyes.agents.policy import SamplingConfig

        return SamplingConfig(temperature=0.0, max_new_tokens=max_tokens, stop=[])

    def scan_messages(self, image: Image.Image, question: str) -> tuple[list[dict[str, Any]], tuple[int, int]]:
        """The conversation a scan sends, and the size of the image in it."""
        cfg = self.config
        sent = fit_image(image, cfg.image_side)
        prompt = cfg.scan_prompt.format(
            width=sent.width, height=sent.height, max_regions=cfg.max_regions, question=question
        )
        return user_message(sent, prompt), sent.size

    def drill_messages(self, image: Image.Image, box: Box, question: str) -> list[dict[str, Any]]:
        """The conversation a drill sends: the region cropped at full resolution."""
        x1, y1, x2, y2 = clamp_box(box, image.size)
        crop = image.crop((round(x1), round(y1), max(round(x2), round(x1) + 1), max(round(y2), round(y1) + 1)))
        return user_message(fit_image(crop, self.config.image_side), self.config.drill_prompt.format(question=question))

    def scan(
        self,
        image: Image.Image,
        question: str,
        *,
        case: Case | None = None,
        rng: np.random.Generator | None = None,
    ) -> list[ScoredRegion]:
        """Ask the model for abnormal regions as JSON boxes."""
        messages, sent = self.scan_messages(image, question)
        (turn,) = self.backend.generate([messages], self._sampling(self.config.scan_max_tokens))
        cfg = self.config
        return parse_regions(turn.text, sent, image.size, cfg.default_confidence, cfg.max_regions)

    def drill(
        self,
        image: Image.Image,
        box: Box,
        question: str,
        *,
        case: Case | None = None,
        rng: np.random.Generator | None = None,
    ) -> float:
        """P("yes") to "Is any abnormality in this region?" on the full-resolution crop."""
        from medeyes.agents.backends.openai import yes_probability

        messages = self.drill_messages(image, box, question)
        return float(yes_probability(self.backend, messages, top_logprobs=self.config.top_logprobs))

    def read(
        self,
        image: Image.Image,
        question: str,
        options: Sequence[str],
        *,
        focus: Box | None = None,
        case: Case | None = None,
        rng: np.random.Generator | None = None,
    ) -> str | None:
        """Ask the model the question itself (options listed), on the whole image."""
        if not self.config.read_facts:
            return None
        listing = "".join(f"({chr(65 + i)}) {o}\n" for i, o in enumerate(options))
        messages = user_message(
            fit_image(image, self.config.image_side), READ_PROMPT.format(question=question, options=listing)
        )
        (turn,) = self.backend.generate([messages], self._sampling(16))
        return turn.text.strip() or None
