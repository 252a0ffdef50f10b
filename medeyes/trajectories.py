"""The one trajectory record, and the store that keeps records as JSONL with images beside them.

A run directory holds::

    run/
      run.json              who produced the records (written once; a resume must match it)
      trajectories.jsonl    one TrajectoryRecord per line, appended atomically
      images/<sha256>.png   every observation image, stored once by the hash of its pixels

``rollout``, ``expert``, ``train`` and ``inspect`` read and write only this format.

Crash safety: each record is one ``write`` of a complete line on an ``O_APPEND``
descriptor, followed by ``fsync``; images are written to a temporary file and
renamed into place *before* the record that names them. So after a crash the
file ends either with a complete record or with a torn last line. When
:class:`TrajectoryStore` opens the run for writing, a last line that still parses
as a record (only its newline was lost) is kept and completed; one that does not
is moved to ``trajectories.jsonl.torn`` (appended, never deleted) and reported.
A resumed run skips every ``trajectory_id`` already present, so nothing is
written twice.

Everything read here is data: JSON (duplicate keys, deep nesting, bytes that are not
UTF-8 and 5000-digit numbers are :class:`RecordError` naming ``FILE:LINE``) and PNG
images opened with a pixel limit.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medeyes_env.cases import MAX_IMAGE_PIXELS, Box
from medeyes_env.errors import RecordError
from medeyes_env.protocol import Action
from medeyes_env.strict_json import BadInput, decode, load_file, loads

SCHEMA_VERSION = 1
"""Version of :class:`TrajectoryRecord`; readers refuse any other."""

RECORDS_FILE = "trajectories.jsonl"
RUN_FILE = "run.json"
IMAGES_DIR = "images"
TORN_SUFFIX = ".torn"
MAX_RUN_INFO_BYTES = 16 * 1024 * 1024
"""Largest ``run.json`` read (a producer with its config is a few kB)."""


class ImageStore(Protocol):
    """Where a record's images are read from: :class:`TrajectoryStore` or :class:`~medeyes.memory_store.MemoryStore`."""

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
    reward_components: dict[str, float] = Field(
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
    answer_type: str = Field(description="closed, choice or open.")
    options: list[str] = Field(default_factory=list, description="Choices of a CHOICE question.")
    gold_answer: str = Field(description="The case's gold answer.")
    gold_boxes: list[Box] = Field(default_factory=list, description="Gold region boxes, original-image pixels.")
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
    reward: float = Field(
        default=0.0, description="Total episode reward: the sum of what env.step returned (malformed penalties in)."
    )
    reward_components: dict[str, float] = Field(default_factory=dict, description="Final reward components.")
    producer: Producer = Field(description="What produced the turns.")
    timings: Timings = Field(default_factory=Timings, description="Where the time went.")
    error: str | None = Field(default=None, description="Why the episode failed, if the agent or env raised.")
    error_type: str | None = Field(default=None, description="Exception class name of ``error``.")
    kept: bool = Field(default=True, description="False when a filter (keep-only-correct) dropped it from the store.")
    agent_info: dict[str, Any] = Field(default_factory=dict, description="Agent-specific facts (e.g. expert evidence).")

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


class TrajectoryStore:
    """A run directory of trajectory records (JSONL) and content-addressed PNG images.

    Opening an existing run for writing repairs its last line when an append was interrupted: a line
    that parses as a record is kept (its newline added, ``completed_tail`` set); one that does not is
    moved to ``trajectories.jsonl.torn`` (``repaired``: its size in bytes, ``torn_path``: where).
    """

    def __init__(
        self, root: str | os.PathLike[str], producer: Producer | None = None, *, read_only: bool = False
    ) -> None:
        """Open (or create) the run directory ``root``.

        Args:
            root: the run directory.
            producer: when given, ``run.json`` must name the same producer (written on first use), so a
                resumed run never mixes two agents' trajectories.
            read_only: open an existing run for reading: no directories made, no repair, no writes.

        """
        self.root = Path(root)
        self.read_only = read_only
        self.completed_tail = False
        """True when opening added the newline a complete last record had lost."""
        self.torn_path: Path | None = None
        """Where an unparseable last line was moved, when opening moved one."""
        if self.root.exists() and not self.root.is_dir():
            raise RecordError(f"trajectory store {self.root} exists and is not a directory; pass a directory path")
        if read_only:
            if not self.root.is_dir():
                raise RecordError(f"no run directory at {self.root}")
            self.repaired = 0
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            self.images_dir.mkdir(exist_ok=True)
            self.repaired = self._repair_torn_tail()
        self._ids: set[str] = set(self._scan_ids())
        self._known_images: set[str] = set()
        if producer is not None:
            self._check_producer(producer)

    # -- paths ---------------------------------------------------------------------------------------

    @property
    def records_path(self) -> Path:
        """The JSONL file of records."""
        return self.root / RECORDS_FILE

    @property
    def images_dir(self) -> Path:
        """Folder of ``<sha256>.png`` images."""
        return self.root / IMAGES_DIR

    def image_path(self, digest: str) -> Path:
        """Path of the image stored under ``digest``."""
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise RecordError(f"{digest!r} is not a sha256 image name (64 lowercase hex digits)")
        return self.images_dir / f"{digest}.png"

    # -- writing -------------------------------------------------------------------------------------

    def _writable(self) -> None:
        if self.read_only:
            raise RecordError(f"{self.root} was opened read-only")

    def put_image(self, image: Image.Image | np.ndarray) -> str:
        """Store an image once (by content hash) and return its digest."""
        self._writable()
        digest = image_digest(image)
        if digest in self._known_images:
            return digest
        path = self.image_path(digest)
        if not path.exists():
            if isinstance(image, np.ndarray):
                image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG", compress_level=1)
            _atomic_write_bytes(path, buffer.getvalue())
        self._known_images.add(digest)
        return digest

    def __contains__(self, trajectory_id: object) -> bool:
        return trajectory_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def append(self, record: TrajectoryRecord) -> bool:
        """Append one record atomically; returns False (and writes nothing) if its id is already stored."""
        self._writable()
        if record.schema_version != SCHEMA_VERSION:
            raise RecordError(
                f"cannot write schema_version {record.schema_version}; this store writes {SCHEMA_VERSION}"
            )
        if record.trajectory_id in self._ids:
            return False
        for digest in _image_refs(record):
            if digest not in self._known_images and not self.image_path(digest).exists():
                raise RecordError(
                    f"record {record.trajectory_id!r} names image {digest} that is not in {self.images_dir}; "
                    "store images with put_image() before appending the record"
                )
        line = (record.model_dump_json() + "\n").encode("utf-8")
        fd = os.open(self.records_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            while written < len(line):  # os.write may be partial on some filesystems
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        self._ids.add(record.trajectory_id)
        return True

    def write_run_info(self, info: dict[str, Any]) -> None:
        """Write ``run.json`` (atomically), e.g. the command line and producer of the run."""
        _atomic_write_bytes(self.root / RUN_FILE, json.dumps(info, indent=2, default=str).encode())

    def run_info(self) -> dict[str, Any] | None:
        """The contents of ``run.json``, or None when absent."""
        path = self.root / RUN_FILE
        if not path.exists():
            return None
        try:
            info = load_file(path, MAX_RUN_INFO_BYTES)
        except (BadInput, OSError) as exc:
            where = exc.at(path) if isinstance(exc, BadInput) else f"{path}: {exc}"
            raise RecordError(f"{where}; delete it or use a new run directory") from None
        if not isinstance(info, dict):
            raise RecordError(f"{path}: expected a JSON object, got {type(info).__name__}")
        return info

    # -- reading -------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[TrajectoryRecord]:
        return self.records()

    def records(self) -> Iterator[TrajectoryRecord]:
        """Every stored record, in file order (a torn last line of a run still being written is skipped)."""
        if self.records_path.exists():
            yield from _iter_records(self.records_path)

    def load_image(self, digest: str) -> Image.Image:
        """Load a stored image as RGB; a missing, corrupt, oversized or non-file image is a :class:`RecordError`."""
        path = self.image_path(digest)
        if not path.exists():
            raise RecordError(f"image {digest} is missing from {self.images_dir}; the run directory is incomplete")
        if not path.is_file():
            raise RecordError(f"{path}: not an image file (a directory or special file)")
        try:
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise RecordError(
                        f"{path}: {width}x{height} pixels, above the {MAX_IMAGE_PIXELS:,}-pixel limit of a stored image"
                    )
                image.load()
                return image.convert("RGB")
        except RecordError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise RecordError(f"{path}: cannot read the stored image ({exc})") from None

    # -- internals -----------------------------------------------------------------------------------

    def _check_producer(self, producer: Producer) -> None:
        info = self.run_info()
        wanted = producer.model_dump(mode="json")
        if info is None:
            if not self.read_only:
                self.write_run_info({"schema_version": SCHEMA_VERSION, "producer": wanted})
            return
        stored = info.get("producer")
        if stored != wanted:
            raise RecordError(
                f"{self.root} holds trajectories of another producer ({_short(stored)}), not {_short(wanted)}; "
                "resume only with the same agent and configuration, or pass a new output directory"
            )

    def _repair_torn_tail(self) -> int:
        """Complete a last record that lost only its newline; move an unparseable last line to ``.torn``."""
        path = self.records_path
        if not path.exists() or path.stat().st_size == 0:
            return 0
        with path.open("rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return 0
            keep = _last_line_start(handle, size)
            handle.seek(keep)
            tail = handle.read(size - keep)
            if _parses(tail, f"{path}:tail"):
                handle.seek(size)
                handle.write(b"\n")
                handle.flush()
                os.fsync(handle.fileno())
                self.completed_tail = True
                return 0
            torn = path.with_name(path.name + TORN_SUFFIX)
            with torn.open("ab") as aside:  # kept, not destroyed: appended before the cut
                aside.write(tail + b"\n")
                aside.flush()
                os.fsync(aside.fileno())
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
            self.torn_path = torn
            return size - keep

    def _scan_ids(self) -> Iterator[str]:
        if not self.records_path.exists():
            return
        for where, raw, tail in _lines(self.records_path):
            if tail:
                record = _tail_record(raw, where)
                if record is not None:
                    yield record.trajectory_id
                continue
            try:
                data = loads(decode(raw))
            except BadInput as exc:
                raise RecordError(
                    f"{where}: {exc}; the file was edited or corrupted "
                    "(a torn last line is repaired automatically, a broken middle line is not)"
                ) from None
            if isinstance(data, dict) and "trajectory_id" in data:
                yield str(data["trajectory_id"])


def _last_line_start(handle: Any, size: int) -> int:
    """Offset just after the last newline before ``size`` (0 when there is none)."""
    position, chunk = size, 65536
    while position > 0:
        start = max(0, position - chunk)
        handle.seek(start)
        block = handle.read(position - start)
        newline = block.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


def _tail_record(raw: bytes, where: str) -> TrajectoryRecord | None:
    """The record on a last line without its newline, or None when it does not parse (torn, or being written)."""
    try:
        return parse_record(decode(raw), where)
    except (RecordError, BadInput):
        return None


def _parses(raw: bytes, where: str) -> bool:
    return _tail_record(raw, where) is not None


def _lines(path: Path) -> Iterator[tuple[str, bytes, bool]]:
    """``(FILE:LINE, raw bytes, is a last line without its newline)`` for every non-blank line of ``path``."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if raw.strip():
                yield f"{path}:{number}", raw, not raw.endswith(b"\n")


def _iter_records(path: Path) -> Iterator[TrajectoryRecord]:
    """Records of a JSONL file; a last line that does not parse (torn or being written) is skipped."""
    for where, raw, tail in _lines(path):
        if tail:
            record = _tail_record(raw, where)
            if record is not None:
                yield record
            return
        try:
            text = decode(raw)
        except BadInput as exc:
            raise RecordError(f"{where}: {exc}") from None
        yield parse_record(text, where)


def _short(producer: Any) -> str:
    if not isinstance(producer, dict):
        return repr(producer)
    return f"{producer.get('kind')}:{producer.get('name')}" + (
        f" oracle={producer['oracle']}" if producer.get("oracle") else ""
    )


def _image_refs(record: TrajectoryRecord) -> list[str]:
    refs = [record.image, record.original_image] + [step.observation_image for step in record.steps]
    return [ref for ref in refs if ref is not None]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_records(path: str | os.PathLike[str]) -> list[TrajectoryRecord]:
    """Read every record of a run directory or a ``.jsonl`` file (no repair, no writes)."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS_FILE
    if not path.is_file():
        raise RecordError(f"no trajectories at {path}; pass a run directory (with {RECORDS_FILE}) or a .jsonl file")
    return list(_iter_records(path))
