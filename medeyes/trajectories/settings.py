"""What defines the episodes of a stored run (:class:`EpisodeSettings`), so a resume never mixes two settings.

A resumed run skips every trajectory id its store already holds. Ids are ``case#s{seed}#k`` and case ids are
per source and often positional (``phantom/test/000000`` in every phantom preset), so an id alone does not say
which dataset, environment or scoring produced an episode. A store opened with settings records them in
``run.json`` when it is created, and refuses a later run whose settings differ, naming the field
(:class:`~medeyes_env.errors.StoreMismatchError`). The run seed is not a setting: it is part of every id.

A new option that changes results joins the settings as one more keyword of :func:`episode_settings`, where
the command builds them (``medeyes eval``: :mod:`medeyes.evaluation.run`; ``medeyes rollout``: its CLI).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from medeyes_env.cases import Case, Split
from medeyes_env.env import EnvConfig
from medeyes_env.errors import StoreMismatchError
from medeyes_env.sources import CaseSource

PROCEDURAL_DIGEST_CASES = 64
"""Cases of a procedural (infinite) split that :func:`data_digest` hashes."""
HINTS = {"data_digest": " (the dataset's cases or files changed)"}
"""What a difference in a field means, where its name does not say."""


class EpisodeSettings(BaseModel):
    """Everything besides the agent (``run.json``'s producer) and the seed that decides what an episode is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str = Field(description="The data spec as given, e.g. 'phantom:hard' (a training run's with its options).")
    data_digest: str = Field(description="Digest of the split's cases and files (see data_digest).")
    split: str = Field(description="Split the cases come from.")
    env: dict[str, Any] = Field(
        description="The EnvConfig played: tool turns, views, prompt, box format, reward weights and scoring."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Every other option that changes results, by name (tools, samples, ...)."
    )


def episode_settings(data: str, source: CaseSource, split: Split, env: EnvConfig, **options: Any) -> EpisodeSettings:
    """The settings of a run; each further option that changes what an episode is goes in as a keyword.

    >>> from medeyes_env.sources import open_source
    >>> easy = episode_settings("phantom:easy", open_source("phantom:easy"), "test", EnvConfig(), tools=True)
    >>> hard = episode_settings("phantom:hard", open_source("phantom:hard"), "test", EnvConfig(), tools=True)
    >>> easy.data_digest != hard.data_digest, easy.options
    (True, {'tools': True})
    """
    return EpisodeSettings(
        data=data,
        data_digest=data_digest(source, split),
        split=split,
        env=env.model_dump(mode="json"),
        options=json.loads(json.dumps(options, sort_keys=True, default=str)),
    )


def data_digest(source: CaseSource, split: Split) -> str:
    """sha256 (first 16 hex digits) of what a split's cases are, read without decoding an image.

    It hashes every case of a finite split (the first :data:`PROCEDURAL_DIGEST_CASES` of a procedural one):
    id, question, answer, type, options, regions, look-alikes, modality, organ, image size and meta; for an
    image file its path and size in bytes; for a source read from files (parquet) each file's path and size.
    Sizes, not contents or modification times: hashing every image would read the whole dataset, and a copy
    of the dataset (new times, same bytes) should still resume. An image replaced by one of exactly the same
    byte size goes unnoticed.
    """
    digest = hashlib.sha256()
    size = source.size(split)
    for index in range(PROCEDURAL_DIGEST_CASES if size is None else size):
        digest.update(_case_bytes(source.case(split, index)))
    for path in getattr(source, "files", ()):
        digest.update(f"file {path} {_file_size(Path(path))}\n".encode())
    return digest.hexdigest()[:16]


def _case_bytes(case: Case) -> bytes:
    text = case.model_dump_json(exclude={"image_path"})
    if case.image_path is not None:
        text += f" image {case.image_path} {_file_size(case.image_path)}"
    return (text + "\n").encode()


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def check_settings(where: object, stored: Any, wanted: EpisodeSettings) -> None:
    """Refuse (:class:`StoreMismatchError`) when ``stored`` (from ``run.json``) differs from ``wanted``."""
    differences = settings_differences(stored, wanted.model_dump(mode="json"))
    if not differences:
        return
    field, old, new = differences[0]
    more = f" (and {len(differences) - 1} more: {', '.join(d[0] for d in differences[1:4])})" if differences[1:] else ""
    raise StoreMismatchError(
        f"{where} holds episodes of other settings: {field}: stored {_short(old)}, this run {_short(new)}"
        f"{HINTS.get(field, '')}{more}; resume with the same settings, or pass a new output directory"
    )


def settings_differences(stored: Any, wanted: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted field, stored value, wanted value)`` for every field that differs, in field order.

    >>> settings_differences({"env": {"max_steps": 4}, "split": "test"}, {"env": {"max_steps": 1}, "split": "test"})
    [('env.max_steps', 4, 1)]
    """
    old = _flatten(stored if isinstance(stored, Mapping) else {"settings": stored})
    new = _flatten(wanted)
    missing = object()
    return [
        (key, old.get(key), new.get(key))
        for key in [*new, *(k for k in old if k not in new)]
        if old.get(key, missing) != new.get(key, missing)
    ]


def _flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, Mapping) and item:
            flat.update(_flatten(item, name + "."))
        else:
            flat[name] = item
    return flat


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
