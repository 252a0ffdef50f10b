"""The in-RAM record sink: a trajectory store for rollouts that are consumed by the step that made them."""

from __future__ import annotations

import numpy as np
from PIL import Image

from medeyes.trajectories.records import TrajectoryRecord, image_digest


class MemoryStore:
    """A :class:`~medeyes.trajectories.records.RecordSink` in RAM: what ``run_rollout`` and ``chat_messages`` need.

    On-policy rollouts are consumed by the step that made them: no PNG encoding, no fsync. The same image
    (by content hash) is always the same PIL object, which lets the tokeniser's segment cache hit.
    """

    def __init__(self) -> None:
        """An empty store."""
        self.images: dict[str, Image.Image] = {}
        self.ids: set[str] = set()
        # The G rollouts of a case share one original PIL image: hash it once (the object is kept alive
        # in `images`, so its id is not reused while this store lives).
        self._digest_of_pil: dict[int, str] = {}

    def put_image(self, image: Image.Image | np.ndarray) -> str:
        """Keep ``image`` (PIL or array) under its content hash."""
        if isinstance(image, Image.Image) and id(image) in self._digest_of_pil:
            return self._digest_of_pil[id(image)]
        digest = image_digest(image)
        if isinstance(image, Image.Image) and self.images.get(digest, image) is image:
            self._digest_of_pil[id(image)] = digest
        if digest not in self.images:
            self.images[digest] = image if isinstance(image, Image.Image) else Image.fromarray(image)
        return digest

    def load_image(self, digest: str) -> Image.Image:
        """The image stored under ``digest``."""
        return self.images[digest]

    def append(self, record: TrajectoryRecord) -> bool:
        """Remember the id only (records are returned by ``run_rollout`` anyway)."""
        if record.trajectory_id in self.ids:
            return False
        self.ids.add(record.trajectory_id)
        return True

    def __contains__(self, trajectory_id: object) -> bool:
        return trajectory_id in self.ids
