"""``MedEyesEnv``: scan, drill and answer on a medical image, with verifiable rewards.

## Description
Each episode is one :class:`~medeyes_env.cases.Case`: an image and a question.
The agent first sees a downsampled overview, then speaks turns in the text
protocol of :mod:`medeyes_env.protocol`: ``scan`` several regions (a montage of
their zoomed crops comes back), ``drill`` into one region (a full-resolution
zoom comes back), and finally ``answer``.

## Action Space
``Text``: one model response, e.g.
``<reasoning>the left base looks dense</reasoning><action>{"name": "drill", "box": [120, 600, 380, 860]}</action>``.
Boxes are ``xyxy`` pixels of the ORIGINAL image. Anything that does not parse
is not an error: the episode goes on with a ``<feedback>`` message saying what
was wrong, the turn counts, and the grammar reward of the episode drops to 0.

## Observation Space
``Dict(image=Box(0, 255, (view_size, view_size, 3), uint8), text=Text(printable))``:
the current view (overview, drill zoom or scan montage, letterboxed to a square)
and the text that comes with it (the question and protocol at reset, a
``<feedback>`` message after each turn).

## Rewards
Paid once, at the end of the episode: ``R = 0.7 r_acc + 0.2 r_grammar + 0.1 r_div``
(paper weights, :class:`~medeyes_env.rewards.RewardConfig`), plus optional
grounding and tool terms. Every component is reported in ``info["reward_components"]``
at every step (computed on the episode so far), so a logger never has to recompute
them. An optional per-turn ``malformed_penalty`` is subtracted for each unparseable turn.

## Starting State
A case drawn from the source's split with ``self.np_random`` (so one seed gives
one episode), or the one named by ``options={"case_index": i}`` or ``options={"case": case}``.
``options={"drill_image": image}`` (an image of the case's size) makes every drill view come from that
image while the overview and scans show the case's own: the ``drill_swap`` counterfactual of docs/eval.md,
which shows a drill of the same box on another image (the phantom's class-swapped case).

## Episode End
Terminated when the agent answers. Truncated when ``max_steps`` tool turns have
been taken and the next turn is not an answer (accuracy 0).

## Arguments
``source`` (spec string such as ``"phantom"`` or a CaseSource), ``split``,
``config`` (:class:`EnvConfig`, or its fields as keyword arguments), ``render_mode``.

## Version History
- v0: initial release.
"""

from __future__ import annotations

import base64
import copy
import io
import re
import string
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from medeyes_env import views
from medeyes_env.cases import AnswerType, Box, Case, Split
from medeyes_env.episode_score import EpisodeScore
from medeyes_env.errors import ConfigError
from medeyes_env.protocol import (
    Action,
    BoxFormat,
    ParsedTurn,
    ProtocolLimits,
    format_box,
    parse_turn,
    protocol_instructions,
)
from medeyes_env.render_ahead import RenderAhead
from medeyes_env.rewards import RewardConfig
from medeyes_env.sources import CaseSource, open_source

TEXT_CHARSET = frozenset(string.printable)
PROCEDURAL_CASES = 2**31 - 1
"""Case indices a reset draws from on a procedural (infinite) source: ``[0, PROCEDURAL_CASES)``."""
ImageFormat = Literal["pil", "data_url"]
_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}


class EnvConfig(BaseModel):
    """Everything that shapes an episode; the defaults follow the paper where it says."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(default=4, ge=0, le=32, description="T_max: tool turns allowed before the answer (paper 4).")
    view_size: int = Field(default=256, ge=32, le=2048, description="Side in pixels of every image observation.")
    drill_min_side: int = Field(default=96, ge=8, description="Smallest region side (original px) a drill shows.")
    scan_mode: Literal["montage", "outline"] = Field(
        default="montage", description="montage: a grid of zoomed crops; outline: the overview with boxes drawn."
    )
    scan_detail: Literal["overview", "full"] = Field(
        default="overview",
        description="What a scan montage tile may show: overview (tiles cut from the overview, so a scan "
        "localises and only a drill shows full-resolution detail) or full (tiles zoomed from the original: a "
        "one-box scan is then a drill in all but name).",
    )
    zoom_filter: Literal["bilinear", "nearest"] = Field(
        default="bilinear",
        description="Filter that magnifies drill and scan regions: bilinear (smooth) or nearest (each original "
        "pixel as a block; about 4x faster per step). Regions larger than the view are always area-averaged.",
    )
    malformed_penalty: float = Field(default=0.0, ge=0.0, description="Subtracted per unparseable turn.")
    instructions: Literal["full", "brief", "none"] = Field(
        default="full",
        description="System prompt: full (protocol with worked examples), brief (the same rules in a third of "
        "the tokens), or none (no system message: for small models trained from scratch, to which a constant "
        "prefix says nothing and costs a third of every sequence).",
    )
    box_format: BoxFormat = Field(
        default_factory=BoxFormat,
        description="How the model writes and reads boxes: pixels (the paper, Qwen2.5-VL), norm1000 (Qwen2-VL), or "
        "loc tokens (the tiny models). Inside the environment every box is xyxy pixels of the original image.",
    )
    max_text_chars: int = Field(default=8192, ge=256, description="Longest text observation.")
    rewards: RewardConfig = Field(default_factory=RewardConfig)
    limits: ProtocolLimits = Field(default_factory=ProtocolLimits)
    render_size: int = Field(default=512, ge=64, description="Side of the render() image.")
    render_gold: bool = Field(default=True, description="Draw gold regions in render() (green).")


class Turn(BaseModel):
    """One turn of the episode as the environment saw it."""

    text: str
    parsed: ParsedTurn
    shown_boxes: list[Box] = Field(default_factory=list, description="Regions the view actually showed.")
    feedback: str


_NOT_PRINTABLE = re.compile(f"[^{re.escape(string.printable)}]")


def _printable(text: str, limit: int) -> str:
    clean = _NOT_PRINTABLE.sub("?", text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


class MedEyesEnv(gym.Env[dict[str, Any], str]):
    """Progressive visual diagnosis: scan, drill, answer. See the module docstring for the full card."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 2}

    def __init__(
        self,
        source: str | CaseSource = "phantom",
        split: Split = "train",
        config: EnvConfig | None = None,
        render_mode: str | None = None,
        render_ahead: bool = True,
        **config_overrides: Any,
    ) -> None:
        """An environment on ``source``'s ``split``; ``config`` or keyword overrides of :class:`EnvConfig`.

        ``render_ahead``: while an episode runs, load the next case in a background thread when the env draws
        its own cases (after a reset with neither seed nor options: a vector env's autoreset, a loop that streams
        cases), so the next such reset finds its image ready. The same images; only when they are made changes,
        so it is not part of :class:`EnvConfig` (not a setting of the episodes).
        """
        if config is not None and config_overrides:
            raise ConfigError(f"pass either config or keyword overrides, not both (got {sorted(config_overrides)})")
        try:
            self.config = config or EnvConfig(**config_overrides)
        except ValueError as exc:
            raise ConfigError(f"invalid MedEyesEnv configuration: {exc}") from exc
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ConfigError(f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.source = open_source(source) if isinstance(source, str) else source
        self.split: Split = split
        self.render_mode = render_mode
        self.render_ahead = render_ahead
        size = self.config.view_size
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, 255, (size, size, 3), np.uint8),
                "text": spaces.Text(max_length=self.config.max_text_chars, charset=TEXT_CHARSET),
            }
        )
        self.action_space = spaces.Text(max_length=self.config.limits.max_chars, min_length=0, charset=TEXT_CHARSET)
        self.case: Case | None = None
        self.image: Image.Image | None = None
        self.turns: list[Turn] = []
        self._views: list[Image.Image] = []
        self._prompt = ""
        self._answer: str | None = None
        self._done = False
        self._pixels: Image.Image | None = None  # what views are cut from: the image, or its one channel
        self._drill_pixels: Image.Image | None = None  # what drill views are cut from, when not _pixels
        self._view_cache: OrderedDict[tuple[str, str], tuple[Image.Image, Image.Image]] = OrderedDict()
        self._score: EpisodeScore | None = None  # the reward components of the episode so far
        self._render_ahead: RenderAhead[tuple[Image.Image, Image.Image, Image.Image]] = RenderAhead()

    # -- the Gymnasium API ---------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """Start an episode on a case drawn with ``self.np_random`` or named in ``options``."""
        super().reset(seed=seed)
        options = options or {}
        index = None
        if "case" in options:
            case = options["case"]
            if not isinstance(case, Case):
                raise TypeError(f"options['case'] must be a Case, got {type(case).__name__}")
        else:
            index = options.get("case_index")
            if index is None:
                index = self._draw_index(self.np_random)
            elif not isinstance(index, (int, np.integer)) or index < 0:
                raise ValueError(f"options['case_index'] must be a non-negative int, got {index!r}")
            case = self.source.case(self.split, int(index))
        self.case = case
        ready = self._render_ahead.take((self.split, index))
        if ready is None:
            self.image = case.load_image()
        else:
            self.image, overview, pixels = ready
            self._view_cache[(case.source, case.id)] = (overview, pixels)
        if seed is None and not options and self.render_ahead:
            self._load_next_case_ahead()
        self.turns, self._answer, self._done = [], None, False
        self._score = EpisodeScore(case, self.config.rewards)
        first_view = self._prepare_views(case)
        self._drill_pixels = self._drill_source(options.get("drill_image"))
        self._views = [first_view]
        self._prompt = self._question_text(case)
        return self._observation(first_view, self._prompt), self._info()

    def step(self, action: str) -> tuple[dict, float, bool, bool, dict]:
        """Execute one turn of model text; never raises on malformed text."""
        if self.case is None or self.image is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        if self._done:
            raise gym.error.ResetNeeded("the episode has ended; call reset() before step()")
        text = action if isinstance(action, str) else self._coerce_action(action)
        parsed = parse_turn(text, self.image.size, self.config.limits, self.config.box_format)
        tool_turns_left = self.config.max_steps - len(self.turns)
        shown: list[Box] = []
        terminated = truncated = False
        view = self._views[-1]

        if not parsed.ok:
            feedback = f"Your last turn could not be executed: {parsed.error}"
        elif parsed.action.name == "answer":
            self._answer = parsed.action.answer
            terminated = True
            feedback = "Answer received."
        elif tool_turns_left <= 0:
            feedback = f"No tool turns left (max_steps={self.config.max_steps}); you must answer."
            parsed = parsed.model_copy(update={"notes": (*parsed.notes, "tool call refused: no turns left")})
        else:
            view, shown, feedback = self._look(parsed.action)
        is_drill = parsed.ok and parsed.action.name == "drill"
        if parsed.notes:
            feedback += " Note: " + " ".join(parsed.notes)

        used_turns = len(self.turns) + 1
        if not terminated and used_turns > self.config.max_steps:
            truncated = True
            feedback += " The episode ended without an answer."
        elif not terminated:
            remaining = self.config.max_steps + 1 - used_turns
            feedback += f" Turns left: {remaining}" + (" (this one must be an answer)." if remaining == 1 else ".")
        self.turns.append(Turn(text=text, parsed=parsed, shown_boxes=shown, feedback=feedback))
        self._views.append(view)
        self._done = terminated or truncated

        # Only this turn's boxes are scored anew: the same components as score_episode over the whole episode.
        self._score.add_turn(parsed.well_formed, parsed.action.boxes if shown else (), bool(shown) and is_drill)
        components, total = self._score.components(self._answer)
        reward = total if self._done else 0.0
        if not parsed.ok:
            reward -= self.config.malformed_penalty
        obs_text = f"<feedback>{feedback}</feedback>"
        return self._observation(view, obs_text), float(reward), terminated, truncated, self._info(components, total)

    def close(self) -> None:
        """Stop the render-ahead thread (a load in flight finishes)."""
        self._render_ahead.close()
        super().close()

    def render(self) -> np.ndarray | None:
        """RGB array of the image with explored regions drawn (drill red, scan yellow, gold green)."""
        if self.render_mode != "rgb_array" or self.image is None or self.case is None:
            return None
        size = self.config.render_size
        canvas = views.overview(self.image, size)

        def place(boxes: Sequence[Box]) -> list[Box]:
            return views.to_letterbox(boxes, self.image.size, size)

        if self.config.render_gold and self.case.regions:
            canvas = views.draw_boxes(canvas, place([r.box for r in self.case.regions]), [views.GOLD_COLOUR])
        for turn in self.turns:
            if turn.shown_boxes:
                colours = [views.DRILL_COLOUR] if turn.parsed.action.name == "drill" else views.SCAN_COLOURS
                canvas = views.draw_boxes(canvas, place(turn.shown_boxes), colours)
        return np.asarray(canvas)

    # -- what model backends consume ------------------------------------------------------------------

    def chat_messages(self, image_format: ImageFormat = "pil") -> list[dict[str, Any]]:
        """The episode so far as OpenAI-format chat messages, one image per environment message.

        ``image_format="pil"`` gives ``{"type": "image", "image": PIL.Image}`` parts (local
        processors); ``"data_url"`` gives ``{"type": "image_url", "image_url": {"url": ...}}``
        parts (OpenAI-compatible servers such as ``vllm serve``).
        """
        if self.case is None:
            raise gym.error.ResetNeeded("call reset() before chat_messages()")
        system = self.system_prompt()
        messages: list[dict[str, Any]] = [{"role": "system", "content": [_text(system)]}] if system else []
        messages.append({"role": "user", "content": [_image_part(self._views[0], image_format), _text(self._prompt)]})
        for turn, view in zip(self.turns, self._views[1:], strict=True):
            messages.append({"role": "assistant", "content": [_text(turn.text)]})
            if turn.parsed.ok and turn.parsed.action.name == "answer":
                break
            messages.append(
                {
                    "role": "user",
                    "content": [_image_part(view, image_format), _text(f"<feedback>{turn.feedback}</feedback>")],
                }
            )
        return messages

    def system_prompt(self) -> str:
        """The protocol as the model is told it, with this image's size filled in ("" with ``instructions="none"``)."""
        if self.config.instructions == "none":
            return ""
        width, height = self.image.size if self.image is not None else (0, 0)
        # max_steps counts tool turns; the instructions count every turn, the answer included.
        return protocol_instructions(
            width,
            height,
            self.config.max_steps + 1,
            self.config.limits,
            style=self.config.instructions,
            box_format=self.config.box_format,
        )

    @property
    def explored_boxes(self) -> list[Box]:
        """Every region the agent asked to see (clamped to the image), in order: what rewards score.

        The view may show a larger region (``drill_min_side``); rewards judge the agent's own box.
        """
        return [box for turn in self.turns if turn.shown_boxes for box in turn.parsed.action.boxes]

    # -- internals -------------------------------------------------------------------------------------

    def _draw_index(self, rng: np.random.Generator) -> int:
        """The case index a reset without options draws from ``rng``."""
        size = self.source.size(self.split)
        return int(rng.integers(0, size if size else PROCEDURAL_CASES))

    def _load_next_case_ahead(self) -> None:
        """Start loading the case the next option-free, unseeded reset will draw (``np_random`` is not advanced)."""
        split, index = self.split, self._draw_index(copy.deepcopy(self.np_random))

        def load() -> tuple[Image.Image, Image.Image, Image.Image]:
            image = self.source.case(split, index).load_image()
            return (image, *self._views_of(image))

        self._render_ahead.submit((split, index), load)

    def _views_of(self, image: Image.Image) -> tuple[Image.Image, Image.Image]:
        """The overview of ``image`` and the pixels views are cut from.

        Most medical images are grayscale stored as RGB: cutting views from a one-channel copy makes
        each resample about 3x cheaper (same pixels up to rounding: at most 2 grey levels apart).
        """
        pixels = _grey_channel(image) or image
        return views.overview(pixels, self.config.view_size).convert("RGB"), pixels

    def _prepare_views(self, case: Case) -> Image.Image:
        """Make the overview and pick the pixels views are cut from; both are cached per case.

        GRPO replays each case G times in a row, and the area-averaged overview is the costliest view.
        """
        key = (case.source, case.id)
        if key not in self._view_cache:
            self._view_cache[key] = self._views_of(self.image)
        self._view_cache.move_to_end(key)
        while len(self._view_cache) > 16:
            self._view_cache.popitem(last=False)
        overview, self._pixels = self._view_cache[key]
        return overview

    def _drill_source(self, image: object) -> Image.Image | None:
        """The pixels drill views are cut from when ``options["drill_image"]`` replaces the case's (else None)."""
        if image is None:
            return None
        if not isinstance(image, Image.Image):
            raise TypeError(f"options['drill_image'] must be a PIL image, got {type(image).__name__}")
        if image.size != self.image.size:
            raise ValueError(
                f"options['drill_image'] is {image.size[0]}x{image.size[1]} but the case's image is "
                f"{self.image.size[0]}x{self.image.size[1]}; boxes are pixels of the case's image: pass one of its size"
            )
        image = image.convert("RGB")
        return _grey_channel(image) or image

    def _look(self, action: Action) -> tuple[Image.Image, list[Box], str]:
        cfg = self.config
        if action.name == "drill":
            pixels = self._pixels if self._drill_pixels is None else self._drill_pixels
            view, shown_box = views.drill_view(
                pixels, action.boxes[0], cfg.view_size, cfg.drill_min_side, _FILTERS[cfg.zoom_filter]
            )
            return view, [shown_box], f"Zoomed into region {self._fmt_box(shown_box)} at full resolution."
        view, shown = views.scan_view(
            self._pixels,
            action.boxes,
            cfg.view_size,
            cfg.drill_min_side,
            cfg.scan_mode,
            _FILTERS[cfg.zoom_filter],
            cfg.scan_detail,
        )
        listing = "; ".join(f"{i + 1}: {self._fmt_box(b)}" for i, b in enumerate(shown))
        layout = "side by side, numbered" if cfg.scan_mode == "montage" else "outlined on the overview"
        return view, shown, f"Scanned {len(shown)} region(s), shown {layout}: {listing}."

    def _question_text(self, case: Case) -> str:
        width, height = self.image.size
        # The modality is not stated: a modality question must be answered from the pixels, not copied.
        lines = [f"Image: {width}x{height} pixels (this view is downsampled).", case.question]
        if case.answer_type is AnswerType.CHOICE:
            lines += [f"({chr(ord('A') + i)}) {option}" for i, option in enumerate(case.options)]
            lines.append("Answer with the option's letter or text.")
        elif case.answer_type is AnswerType.CLOSED:
            lines.append("Answer yes or no.")
        else:
            lines.append("Answer with a short phrase.")
        return "\n".join(lines)

    def _observation(self, view: Image.Image, text: str) -> dict[str, Any]:
        if view.mode == "L":  # a view cut from a grayscale image: Pillow's merge and pack beat np.stack (50 vs 66 us)
            pixels = np.array(Image.merge("RGB", (view, view, view)))
        else:
            pixels = np.asarray(view, dtype=np.uint8)
            if pixels.ndim == 2:
                pixels = np.stack((pixels, pixels, pixels), axis=-1)
        return {"image": pixels, "text": _printable(text, self.config.max_text_chars)}

    def _info(self, components: dict[str, float] | None = None, total: float = 0.0) -> dict[str, Any]:
        case = self.case
        info: dict[str, Any] = {
            "case_id": case.id,
            "answer_type": case.answer_type.value,
            "image_size": self.image.size,
            "step": len(self.turns),
        }
        if self.turns:
            last = self.turns[-1]
            info.update(
                parsed_ok=last.parsed.ok,
                well_formed=last.parsed.well_formed,
                error=last.parsed.error,
                action=last.parsed.action.name if last.parsed.ok else None,
                shown_boxes=list(last.shown_boxes),
                answer=self._answer,
            )
        if components is not None:
            info["reward_components"] = components  # a new dict each step, as the breakdown's copy was
            info["reward_total"] = total
        return info

    def _fmt_box(self, box: Box) -> str:
        """A box as the model writes it (pixels rounded to whole numbers)."""
        return format_box(box, self.config.box_format, self.image.size if self.image is not None else (1, 1))

    @staticmethod
    def _coerce_action(action: object) -> str:
        if isinstance(action, bytes):
            return action.decode("utf-8", errors="replace")
        # Not text at all: let the parser report it as a malformed turn.
        return f"<not text: {type(action).__name__}>"


def _grey_channel(image: Image.Image) -> Image.Image | None:
    """The one channel of an RGB image whose three channels are equal, else None.

    Compared as the channels' bytes (one ``memcmp`` each): half the time of comparing a numpy copy of the RGB
    pixels, which matters on a procedural source's reset (a new 1024 px image per episode).
    """
    red, green, blue = image.split()
    red_bytes = red.tobytes()
    return red if red_bytes == green.tobytes() == blue.tobytes() else None


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _image_part(image: Image.Image, image_format: ImageFormat) -> dict[str, Any]:
    image = image if image.mode == "RGB" else image.convert("RGB")
    if image_format == "pil":
        return {"type": "image", "image": image}
    if image_format == "data_url":
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()},
        }
    raise ValueError(f"image_format must be 'pil' or 'data_url', got {image_format!r}")
