"""The expert's notes: clinician-style reasoning text from what the oracle saw, and the events it narrates.

Phrasing is drawn from the episode's own wording stream (:class:`Narrator`), so how a note is worded never
changes what the expert does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medeyes.agents.expert.answers import position_words
from medeyes_env.cases import Box
from medeyes_env.protocol import format_box


def fmt_box(box: Box) -> str:
    """A box as the notes write it, whole pixels: ``[x1, y1, x2, y2]`` (whatever the env's box format)."""
    return format_box(box)


def where_phrase(box: Box, size: tuple[int, int]) -> str:
    """Where a box lies, in words: ``upper left``, ``central right``, ..."""
    w = position_words(box, size)
    return f"{w['vertical']} {w['side']}" if w["vertical"] != "middle" else f"central {w['side']}"


class Narrator:
    """Clinician-style notes from oracle events; phrasing varies with the episode's random stream."""

    OPENINGS = (
        "Survey of the {modality} image for: {question}",
        "Working question: {question} First a look over the whole {modality} image.",
        "Reading the {modality} study with this question in mind: {question}",
    )
    SCAN = (
        "{n} candidate region(s) stand out; the most suspicious is {where} at {box} (confidence {c:.2f}). "
        "Comparing them side by side.",
        "I count {n} area(s) worth a closer look, led by the {where} one at {box} ({c:.2f}). Scanning them together.",
        "Candidates: {listing}. Putting them next to each other before choosing one.",
    )
    RESCAN = (
        "Back to surveying: {n} region(s) not yet examined, best {where} at {box} ({c:.2f}).",
        "Widening the search again; {n} remaining candidate(s), the strongest {where} at {box} ({c:.2f}).",
    )
    DRILL = (
        "Region {box} ({where}) has the highest confidence so far, {c:.2f}; zooming in at full resolution.",
        "Drilling into the {where} region {box}, confidence {c:.2f}, to see its detail.",
        "The {where} candidate {box} deserves a close look (confidence {c:.2f}).",
    )
    DRILL_SAMPLED = (
        "Of the leading candidates, the {where} region {box} ({c:.2f}) gets the first close look.",
        "Not the top score, but worth checking: zooming into the {where} region {box} ({c:.2f}).",
    )
    REFINE = (
        "Narrowing to the {part} part of it, {box}, where the finding seems to sit ({c:.2f}).",
        "Zooming further into {box}, the {part} portion of the region ({c:.2f}).",
    )
    GAIN = (
        "The zoomed view of {box} raised the confidence from {a:.2f} to {b:.2f} ({dc:+.0%}).",
        "Up close, {box} looks more convincing: {a:.2f} -> {b:.2f} ({dc:+.0%}).",
    )
    DROP = (
        "At full resolution {box} is less convincing: {a:.2f} -> {b:.2f} ({dc:+.0%}); probably a normal structure.",
        "The detail of {box} does not hold up ({a:.2f} -> {b:.2f}, {dc:+.0%}).",
    )
    SCANNED = (
        "The side-by-side views put {box} first at {c:.2f}.",
        "Across the scanned regions, {box} remains the strongest ({c:.2f}).",
    )
    ANSWER = (
        "Summary: {summary}. Conclusion: {why}.",
        "Putting it together ({summary}): {why}.",
        "Findings: {summary}. Hence: {why}.",
    )

    def __init__(self, rng: np.random.Generator) -> None:
        """Phrase with ``rng``, the episode's own wording stream."""
        self.rng = rng

    def pick(self, templates: Sequence[str], **values: Any) -> str:
        """One template, chosen at random, filled in."""
        return templates[int(self.rng.integers(len(templates)))].format(**values)


def part_name(parent: Box, child: Box) -> str:
    """Which part of ``parent`` the sub-region ``child`` is: ``central`` or ``upper-left``, ``lower-right``, ..."""
    pcx, pcy = (parent[0] + parent[2]) / 2, (parent[1] + parent[3]) / 2
    ccx, ccy = (child[0] + child[2]) / 2, (child[1] + child[3]) / 2
    w, h = parent[2] - parent[0], parent[3] - parent[1]
    if abs(ccx - pcx) < 0.05 * w and abs(ccy - pcy) < 0.05 * h:
        return "central"
    return ("upper" if ccy < pcy else "lower") + "-" + ("left" if ccx < pcx else "right")


@dataclass(frozen=True)
class ScanEvent:
    """A scan-only expert's scan: the strongest region so far."""

    box: Box
    confidence: float


@dataclass(frozen=True)
class DrillEvent:
    """A drill: the region's confidence before and after the close look, and the information gain."""

    box: Box
    before: float
    after: float
    gain: float


Event = ScanEvent | DrillEvent
"""What a tool turn revealed, narrated at the start of the next turn."""


def narrate_event(narrator: Narrator, event: Event | None, delta: float) -> str:
    """The note on what the previous tool turn revealed ('' when nothing is to be said)."""
    if event is None:
        return ""
    if isinstance(event, ScanEvent):
        return narrator.pick(Narrator.SCANNED, box=fmt_box(event.box), c=event.confidence)
    gain = max(-9.99, min(9.99, event.gain))
    values = {"box": fmt_box(event.box), "a": event.before, "b": event.after, "dc": gain}
    return narrator.pick(Narrator.GAIN if event.gain >= delta else Narrator.DROP, **values)


MODALITY_NAMES = {"xray": "X-ray", "ct": "CT", "mri": "MRI"}
"""How the opening note names a case's recorded modality."""


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis.

    >>> clip("a long question", 10)
    'a long...'
    """
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def join_notes(*parts: str) -> str:
    """The non-empty notes, stripped, joined by one space."""
    return " ".join(p.strip() for p in parts if p and p.strip())
