"""The one trajectory record, the store that keeps records as JSONL with images beside them, and its RAM twin.

A run directory holds::

    run/
      run.json              who produced the records and what defines an episode (written once; a resume
                            must match both: see medeyes.trajectories.settings)
      trajectories.jsonl    one TrajectoryRecord per line, appended atomically
      images/<sha256>.png   every observation image, stored once by the hash of its pixels

``rollout``, ``expert``, ``train`` and ``inspect`` read and write only this format. On-policy rollouts that
the step that made them consumes go to :class:`MemoryStore` (:mod:`medeyes.trajectories.memory`) instead:
the same interface, no PNG encoding, no fsync.

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

from medeyes.trajectories.memory import MemoryStore
from medeyes.trajectories.records import (
    SCHEMA_VERSION,
    ImageStore,
    Producer,
    RecordSink,
    StepRecord,
    Timings,
    TrajectoryRecord,
    image_digest,
    parse_record,
)
from medeyes.trajectories.store import (
    IMAGES_DIR,
    MAX_RUN_INFO_BYTES,
    RECORDS_FILE,
    RUN_FILE,
    TORN_SUFFIX,
    TrajectoryStore,
    read_records,
)

__all__ = [
    "IMAGES_DIR",
    "MAX_RUN_INFO_BYTES",
    "RECORDS_FILE",
    "RUN_FILE",
    "SCHEMA_VERSION",
    "TORN_SUFFIX",
    "ImageStore",
    "MemoryStore",
    "Producer",
    "RecordSink",
    "StepRecord",
    "Timings",
    "TrajectoryRecord",
    "TrajectoryStore",
    "image_digest",
    "parse_record",
    "read_records",
]
