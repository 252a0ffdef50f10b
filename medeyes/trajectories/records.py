"""The one trajectory record (:class:`TrajectoryRecord`, versioned), its steps, and reading one from JSON."""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

import numpy as np
from PIL import Image
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, model_validator

from medeyes_env.cases import Box, Region
from medeyes_env.errors import RecordError
from medeyes_env.protocol import Action
from medeyes_env.rewards import METRIC_COMPONENTS, REWARD_COMPONENTS
from medeyes_env.shapes import Shape
from medeyes_env.strict_json import BadInput, loads

SCHEMA_VERSION = 1
"""Version of :class:`TrajectoryRecord`; readers refuse any other."""

UNIT_COMPONENTS = frozenset((*REWARD_COMPONENTS, *METRIC_COMPONENTS))
"""Reward components and metrics that lie in [0, 1] (every one :func:`~medeyes_env.rewards.score_episode` makes)."""


def _finite_box(box: Box) -> Box:
    if not all(math.isfinite(value) for value in box):
        raise ValueError(f"box {list(box)} has a coordinate that is not a finite number")
    return box


FiniteBox = Annotated[Box, AfterValidator(_finite_box)]


def _unit_components(components: dict[str, float]) -> dict[str, float]:
    """Refuse a known component outside [0, 1]: a stored 7.0 accuracy would be scored as 700%."""
    for name, value in components.items():
        if name in UNIT_COMPONENTS and not 0.0 <= value <= 1.0:
            raise ValueError(f"reward_components.{name} is {value}, outside [0, 1]")
    return components


Components = Annotated[dict[str, FiniteFloat], AfterValidator(_unit_components)]


class ImageStore(Protocol):
    """Where a record's images are read from: :class:`TrajectoryStore` or :class:`~medeyes.trajectories.MemoryStore`."""

    def load_image(self, digest: str) -> Image.Image:
        """The image stored under ``digest``."""
        ...


@runtime_checkable
class RecordSink(ImageStore, Protocol):
    """What :func:`~medeyes.rollout.run_rollout` writes to: images by content hash, records by trajectory id."""

    def put_image(self, image: Image.Image | np.ndarray) -> str:
        """Keep ``image``; return its content hash."""
        ...

    def append(self, record: TrajectoryRecord) -> bool:
        """Keep ``record``; False when its id is already kept."""
        ...

    def __contains__(self, trajectory_id: object) -> bool: ...


class Producer(BaseModel):
    """What produced a trajectory: an expert with its oracle and configuration, or a policy and its checkpoint."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["expert", "policy", "random", "other"] = Field(description="Family of the producer.")
    name: str = Field(description="Agent name, e.g. 'expert', 'random', 'policy'.")
    oracle: str | None = Field(default=None, description="Region oracle of an expert, e.g. 'annotation'.")
    checkpoint: str | None = Field(default=None, description="Model checkpoint or name of a policy.")
    config: dict[str, Any] = Field(default_factory=dict, description="The agent's full configuration.")


class StepRecord(BaseModel):
    """One turn: the model's text, what the environment made of it, and what came back."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0, description="0-based turn number within the episode.")
    text: str = Field(description="The model's turn text, exactly as sent to the environment.")
    action: Action | None = Field(description="The parsed action; None when the turn did not parse.")
    reasoning: str | None = Field(default=None, description="The <reasoning> content, as parsed.")
    well_formed: bool = Field(description="The turn followed the protocol exactly (grammar reward's test).")
    error: str | None = Field(default=None, description="Parser feedback for a malformed turn.")
    error_kind: str | None = Field(default=None, description="Machine-readable class of the parse error.")
    shown_boxes: list[Box] = Field(default_factory=list, description="Regions the returned view showed.")
    feedback: str = Field(default="", description="The environment's <feedback> text after this turn.")
    observation_image: str | None = Field(
        default=None, description="sha256 of the view returned after this turn (images/<hash>.png); None at the end."
    )
    reward_components: Components = Field(
        default_factory=dict, description="Every reward component on the episode so far, after this turn."
    )
    token_ids: list[int] | None = Field(default=None, description="Generated token ids, when the agent has them.")
    logprobs: list[float] | None = Field(default=None, description="Per-token log-probabilities of token_ids.")
    finish_reason: str | None = Field(default=None, description="Why generation stopped, when known.")
    agent_seconds: float = Field(default=0.0, ge=0.0, description="This turn's share of the agent's batch time.")
    env_seconds: float = Field(default=0.0, ge=0.0, description="Time the environment took to execute the turn.")
    note: str | None = Field(default=None, description="Agent's own remark about the turn (e.g. GRN mode), if any.")


class Timings(BaseModel):
    """Wall-clock seconds spent on one episode."""

    model_config = ConfigDict(extra="forbid")

    agent: float = Field(default=0.0, ge=0.0, description="Seconds in the agent (its share of batched calls).")
    env: float = Field(default=0.0, ge=0.0, description="Seconds in the environment (reset and steps).")
    total: float = Field(default=0.0, ge=0.0, description="Wall-clock seconds from reset to the last step.")


class TrajectoryRecord(BaseModel):
    """One episode, complete enough to train on, score again and draw.

    The chat messages a model saw can be rebuilt from ``system_prompt``, ``prompt``,
    ``image`` (the first view) and each step's ``text``, ``observation_image`` and
    ``feedback`` (see :meth:`chat_messages`).
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(default=SCHEMA_VERSION, description="Record format version.")
    trajectory_id: str = Field(description="Unique within a run; a resumed run skips ids it already has.")
    case_id: str = Field(description="Case.id of the episode.")
    source: str = Field(description="Source name of the case, e.g. 'phantom'.")
    split: str = Field(description="Split the case came from.")
    sample_index: int = Field(default=0, ge=0, description="Which of the case's trajectories this is (0..N-1).")
    seed: int | None = Field(default=None, description="Seed the environment was reset with.")
    question: str = Field(description="The case's question.")
    answer_type: Literal["closed", "open", "choice"] = Field(description="closed, choice or open.")
    options: list[str] = Field(default_factory=list, description="Choices of a CHOICE question.")
    gold_answer: str = Field(description="The case's gold answer.")
    gold_boxes: list[FiniteBox] = Field(default_factory=list, description="Gold region boxes, original-image pixels.")
    gold_shapes: list[Shape | None] = Field(
        default_factory=list,
        description="Each gold region's exact outline, in gold_boxes' order, None where the region is only a box; "
        "empty when every region is a box (and in records written before shapes).",
    )
    family: str | None = Field(default=None, description="Question family (meta['family']) when the source has one.")
    image_size: tuple[int, int] = Field(description="(width, height) of the original image.")
    original_image: str | None = Field(default=None, description="sha256 of the original image, when stored.")
    system_prompt: str = Field(default="", description="The system message the model saw.")
    prompt: str = Field(default="", description="The first user text (question, options).")
    image: str | None = Field(default=None, description="sha256 of the first view (the overview).")
    steps: list[StepRecord] = Field(default_factory=list, description="Every turn, in order.")
    final_answer: str | None = Field(default=None, description="The answer given; None when truncated.")
    terminated: bool = Field(default=False, description="The episode ended with an answer.")
    truncated: bool = Field(default=False, description="The episode ran out of turns.")
    reward: FiniteFloat = Field(
        default=0.0, description="Total episode reward: the sum of what env.step returned (malformed penalties in)."
    )
    reward_components: Components = Field(default_factory=dict, description="Final reward components.")
    producer: Producer = Field(description="What produced the turns.")
    timings: Timings = Field(default_factory=Timings, description="Where the time went.")
    error: str | None = Field(default=None, description="Why the episode failed, if the agent or env raised.")
    error_type: str | None = Field(default=None, description="Exception class name of ``error``.")
    kept: bool = Field(default=True, description="False when a filter (keep-only-correct) dropped it from the store.")
    agent_info: dict[str, Any] = Field(default_factory=dict, description="Agent-specific facts (e.g. expert evidence).")

    @model_validator(mode="after")
    def _shapes_match_boxes(self) -> TrajectoryRecord:
        if self.gold_shapes and len(self.gold_shapes) != len(self.gold_boxes):
            raise ValueError(
                f"gold_shapes has {len(self.gold_shapes)} entries for {len(self.gold_boxes)} gold_boxes; "
                "give one per box (null for a box-only region) or none"
            )
        return self

    @property
    def gold_regions(self) -> list[Region]:
        """The gold regions as the rewards score them: each box with its shape, when it has one."""
        shapes = self.gold_shapes or [None] * len(self.gold_boxes)
        # model_construct: a stored box was checked finite, a shape valid; an old odd box must not crash a reader.
        return [
            Region.model_construct(box=box, shape=shape) for box, shape in zip(self.gold_boxes, shapes, strict=True)
        ]

    @property
    def correct(self) -> bool:
        """The final answer earned the full accuracy reward."""
        return self.reward_components.get("accuracy", 0.0) >= 1.0

    @property
    def tool_steps(self) -> int:
        """Number of executed scan and drill turns."""
        return sum(1 for s in self.steps if s.action is not None and s.action.name != "answer" and s.shown_boxes)

    @property
    def explored_boxes(self) -> list[Box]:
        """Every box the agent looked at, in order (what the rewards score)."""
        return [box for s in self.steps if s.action is not None and s.shown_boxes for box in s.action.boxes]

    def chat_messages(self, store: ImageStore) -> list[dict[str, Any]]:
        """The conversation as OpenAI-format messages with PIL images loaded from ``store``."""
        system = [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}]
        messages: list[dict[str, Any]] = system if self.system_prompt else []
        messages.append(
            {"role": "user", "content": [_image_part(store, self.image), {"type": "text", "text": self.prompt}]}
        )
        for step in self.steps:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": step.text}]})
            if step.action is not None and step.action.name == "answer":
                break
            if step.observation_image is None:
                break
            messages.append(
                {
                    "role": "user",
                    "content": [
                        _image_part(store, step.observation_image),
                        {"type": "text", "text": f"<feedback>{step.feedback}</feedback>"},
                    ],
                }
            )
        return messages


def _image_part(store: ImageStore, digest: str | None) -> dict[str, Any]:
    if digest is None:
        raise RecordError("this record stores no image for a view; it cannot be turned into chat messages")
    return {"type": "image", "image": store.load_image(digest)}


def image_digest(image: Image.Image | np.ndarray) -> str:
    """sha256 of an image's size, mode and pixels: the same picture always gets the same name.

    >>> image_digest(Image.new("RGB", (2, 2))) == image_digest(np.zeros((2, 2, 3), np.uint8))
    True
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    if image.mode != "RGB":
        image = image.convert("RGB")
    digest = hashlib.sha256(f"{image.width}x{image.height}:{image.mode}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def parse_record(line: str, where: str = "record") -> TrajectoryRecord:
    """Parse one JSONL line into a record, refusing unknown schema versions with a clear message."""
    try:
        data = loads(line)
    except BadInput as exc:
        raise RecordError(f"{where}: {exc}") from None
    if not isinstance(data, dict):
        raise RecordError(f"{where} is a JSON {type(data).__name__}, not a trajectory record object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RecordError(
            f"{where} has schema_version {version!r}; this MedEyes reads trajectory records of version "
            f"{SCHEMA_VERSION} only. Re-create the trajectories with this version, or read them with the MedEyes "
            "release that wrote them."
        )
    try:
        return TrajectoryRecord.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise RecordError(f"{where} is not a valid trajectory record: {field}: {first['msg']}") from None
