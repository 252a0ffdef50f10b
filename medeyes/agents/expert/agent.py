"""The expert: GRN (Gaze-guided Reasoning Navigator) with CVS (Confidence Value Sampler), METHOD.md sections 3-4.

The expert is an :class:`~medeyes.agents.base.Agent`: each turn it speaks protocol text
(:func:`~medeyes_env.protocol.render_turn`) that :class:`~medeyes_env.env.MedEyesEnv` executes and scores
with the same rewards as the policy. Behind the text is a region oracle
(:mod:`medeyes.agents.expert.oracles`) and the GRN state ``psi_t = (R_t, C_t, F_t)``: candidate regions, their
confidences and the mode, kept per episode in ``EpisodeContext.state["grn"]``.

One turn of GRN (``t`` tool turns taken, ``T = min(T_max, env max_steps)``):

1. Terminate (answer) when the last drill's confidence reached ``xi``, or ``t == T``, or nothing is left
   to look at.
2. Mode ``scan``: ask the oracle to scan, merge its candidates into ``R_t, C_t`` (a candidate matching a
   known region by IoU >= ``merge_iou`` updates it, a drilled region keeps its drilled confidence), show the
   ``max_regions`` most confident undrilled regions in one ``scan`` action, switch to ``drill``.
3. Mode ``drill``: pick region ``i`` by CVS (nucleus sampling over ``softmax(C / temperature)`` with mass
   ``p0``; greedy argmax without CVS); drill it and read ``c_{t+1}(r_i)`` from the oracle. The information
   gain ``dc = (c_{t+1} - c_t) / (c_t + eps)`` decides the next mode: ``dc >= delta`` keeps drilling, into the
   sub-region of ``r_i`` (one of five sub-boxes, ``sub_region_scale`` of its side, chosen by CVS over the
   oracle's confidences in the view already at hand) -- else back to ``scan`` (with ``low_gain="next"``: on to
   the next undrilled candidate of the last scan, without a new scan turn).

Ablations (``ExpertConfig.mode``): ``full`` (the above), ``scan_only`` (every tool turn is a scan; evidence is
the scans' confidences, averaged over repeated looks), ``drill_only`` (no scan turns: the oracle's candidates
are ranked silently and drilled one after another), ``greedy`` (without CVS: argmax choices, one
trajectory), ``random`` (the full expert's action sequence, lengths and box sizes, with every box moved to a
uniformly random place; the answer comes from what the oracle saw in those boxes).

How the expert answers: :mod:`medeyes.agents.expert.answers` (one rule per question family); its notes:
:mod:`medeyes.agents.expert.narration`.

The expert never reads ``case.answer``; only the annotation oracle does, through its noise model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from medeyes.agents.base import EpisodeContext, TurnOutput
from medeyes.agents.expert.answers import (
    REGION_FAMILIES,
    RegionBelief,
    derive_answer,
    question_family,
    same_region,
    summarise,
)
from medeyes.agents.expert.config import EXPERT_MODES, ExpertConfig
from medeyes.agents.expert.narration import (
    MODALITY_NAMES,
    DrillEvent,
    Event,
    Narrator,
    ScanEvent,
    clip,
    fmt_box,
    join_notes,
    narrate_event,
    part_name,
    where_phrase,
)
from medeyes.agents.expert.oracles.base import RegionOracle, ScoredRegion
from medeyes.agents.expert.oracles.factory import make_oracle
from medeyes_env.cases import Box
from medeyes_env.errors import ConfigError
from medeyes_env.protocol import Action, render_turn
from medeyes_env.views import clamp_box

# ----------------------------------------------------------------------------------------------------------------------
# GRN state
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """One tool turn of an episode: the action's name and how many boxes it showed."""

    action: str
    n_boxes: int


@dataclass
class GRNState:
    """``psi_t = (R_t, C_t, F_t)`` and the bookkeeping one episode needs."""

    rng: np.random.Generator
    """Draws the oracle's noise and CVS choices."""
    words: np.random.Generator
    """Draws the phrasing of the notes (its own stream, so wording never changes what the expert does)."""
    regions: list[RegionBelief] = field(default_factory=list)
    mode: Literal["scan", "drill"] = "scan"
    tool_steps: int = 0
    focus: int | None = None
    """Index of the region being drilled (refined)."""
    refine: bool = False
    """The last drill gained >= delta: the next drill goes into a sub-region of ``focus``."""
    stop: bool = False
    last_event: Event | None = None
    """What the previous tool turn revealed, narrated in this turn's reasoning."""
    plan: list[tuple[str, int]] | None = None
    """Random mode: the full expert's action names and box counts, replayed with random boxes."""
    calls: list[ToolCall] = field(default_factory=list)
    """Every tool call of the episode (the random mode replays the full expert's)."""
    answered: str | None = None


def nucleus_choice(confidences: Sequence[float], rng: np.random.Generator | None, temperature: float, p0: float) -> int:
    """CVS: sample an index by nucleus sampling over ``softmax(confidences / temperature)``; argmax without ``rng``.

    Keeps the smallest set of top indices whose probability reaches ``p0``, renormalises, draws one.

    >>> nucleus_choice([0.2, 0.9, 0.3], None, 0.2, 0.9)
    1
    >>> nucleus_choice([0.9, 0.1], np.random.default_rng(0), 0.05, 0.9)  # 0.1 falls outside the nucleus
    0
    """
    if not confidences:
        raise ValueError("nucleus_choice needs at least one confidence")
    values = np.asarray(confidences, dtype=np.float64)
    if rng is None:
        return int(np.argmax(values))
    logits = values / temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, p0 - 1e-12)) + 1]
    kept = probs[keep] / probs[keep].sum()
    return int(keep[int(rng.choice(len(keep), p=kept))])


def information_gain(before: float, after: float, eps: float = 1e-6) -> float:
    """``dc = (c_{t+1} - c_t) / (c_t + eps)``.

    >>> round(information_gain(0.5, 0.8), 6)
    0.599999
    """
    return (after - before) / (before + eps)


def sub_regions(box: Box, scale: float, image_size: tuple[int, int]) -> list[Box]:
    """Five sub-boxes of ``box`` with sides ``scale`` times its own: four corners and the centre.

    >>> sub_regions((0, 0, 10, 10), 0.5, (100, 100))[4]
    (2.5, 2.5, 7.5, 7.5)
    """
    x1, y1, x2, y2 = box
    w, h = (x2 - x1) * scale, (y2 - y1) * scale
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    corners = [(x1, y1), (x2 - w, y1), (x1, y2 - h), (x2 - w, y2 - h), (cx - w / 2, cy - h / 2)]
    return [clamp_box((a, b, a + w, b + h), image_size) for a, b in corners]


# ----------------------------------------------------------------------------------------------------------------------
# The agent
# ----------------------------------------------------------------------------------------------------------------------


class ExpertAgent:
    """GRN + CVS over a region oracle, speaking the environment's text protocol (module docstring)."""

    def __init__(self, oracle: RegionOracle | str = "annotation", config: ExpertConfig | None = None) -> None:
        self.oracle = make_oracle(oracle) if isinstance(oracle, str) else oracle
        self.config = config or ExpertConfig()
        self.name = "expert" if self.config.mode != "random" else "expert-random"

    @property
    def samples_per_case(self) -> int:
        """Trajectories the expert wants per case (``n_expert``; 1 without CVS, whose choices are all argmax)."""
        return 1 if self.config.mode == "greedy" else self.config.n_expert

    def describe(self) -> dict[str, Any]:
        """Producer description stored on every trajectory."""
        return {
            "kind": "expert" if self.config.mode != "random" else "random",
            "name": self.name,
            "oracle": self.oracle.name,
            "config": {"expert": self.config.model_dump(), "oracle": self.oracle.describe()},
        }

    def act(self, batch: list[EpisodeContext]) -> list[TurnOutput]:
        """The next turn of every episode."""
        return [TurnOutput(text=self._turn(context), finish_reason="stop") for context in batch]

    # -- one turn ------------------------------------------------------------------------------------

    def _state(self, context: EpisodeContext) -> GRNState:
        state = context.state.get("grn")
        if state is None:
            episode_seed = int(context.state.get("seed", context.episode_id))
            rng = np.random.default_rng([self.config.seed, episode_seed & 0xFFFFFFFF, 0x6E5])
            words = np.random.default_rng([self.config.seed, episode_seed & 0xFFFFFFFF, 0x7E7])
            state = GRNState(rng=rng, words=words)
            context.state["grn"] = state
            if self.config.mode == "random":
                state.plan = self._shadow_plan(context, episode_seed)
        return state

    def _turn(self, context: EpisodeContext) -> str:
        state = self._state(context)
        narrator = Narrator(state.words)
        case = context.case
        budget = min(self.config.t_max, context.max_steps)
        prefix = ""
        if state.tool_steps == 0 and state.last_event is None:
            prefix = narrator.pick(
                Narrator.OPENINGS,
                modality=MODALITY_NAMES.get(case.modality.lower(), case.modality if case.modality != "unknown" else ""),
                question=clip(case.question, 140),
            ).replace("  ", " ")
        else:
            prefix = narrate_event(narrator, state.last_event, self.config.delta)
        state.last_event = None
        if self.config.global_questions == "answer" and question_family(case).lower() not in REGION_FAMILIES:
            state.stop = True
        if state.stop or state.tool_steps >= budget:
            return self._answer(context, state, narrator, prefix)
        if self.config.mode == "random":
            action, plan_text = self._random_step(context, state)
        elif self.config.mode == "scan_only" or (state.mode == "scan" and self.config.mode != "drill_only"):
            action, plan_text = self._scan_step(context, state, narrator)
        else:
            action, plan_text = self._drill_step(context, state, narrator)
        if action is None:
            return self._answer(context, state, narrator, prefix)
        state.tool_steps += 1
        state.calls.append(ToolCall(action.name, len(action.boxes)))
        return render_turn(action, join_notes(prefix, plan_text), context.box_format, context.image.size)

    def _oracle_scan(self, context: EpisodeContext, state: GRNState) -> list[ScoredRegion]:
        return self.oracle.scan(context.image, context.case.question, case=context.case, rng=state.rng)

    def _merge(self, state: GRNState, found: list[ScoredRegion]) -> None:
        for region in found:
            match = None
            for belief in state.regions:
                if same_region(belief.box, region.box, self.config.merge_iou):
                    match = belief
                    break
            if match is None:
                state.regions.append(
                    RegionBelief(region.box, region.confidence, label=region.label, size_estimate=region.extent)
                )
            else:
                match.scanned = (match.scanned * match.looks + region.confidence) / (match.looks + 1)
                match.looks += 1

    def _scan_step(self, context: EpisodeContext, state: GRNState, narrator: Narrator) -> tuple[Action | None, str]:
        cfg = self.config
        for _ in range(1 + cfg.empty_scan_retries):
            found = self._oracle_scan(context, state)
            if found:
                break
        self._merge(state, found)
        undrilled = sorted((r for r in state.regions if r.drilled is None), key=lambda r: -r.scanned)
        shown = undrilled[: cfg.max_regions]
        if not shown:
            state.stop = True
            return None, ""
        size = context.image.size
        top = shown[0]
        listing = ", ".join(f"{fmt_box(r.box)} ({r.scanned:.2f})" for r in shown)
        templates = Narrator.RESCAN if state.tool_steps > 0 else Narrator.SCAN
        text = narrator.pick(
            templates,
            n=len(shown),
            where=where_phrase(top.box, size),
            box=fmt_box(top.box),
            c=top.scanned,
            listing=listing,
        )
        if cfg.mode == "scan_only":
            best = max(state.regions, key=lambda r: r.scanned)
            state.last_event = ScanEvent(best.box, best.scanned)
            if best.scanned >= cfg.xi:
                state.stop = True
        else:
            state.mode = "drill"
        return Action.scan(*(_round_box(r.box) for r in shown)), text

    def _drill_step(self, context: EpisodeContext, state: GRNState, narrator: Narrator) -> tuple[Action | None, str]:
        cfg = self.config
        image, case = context.image, context.case
        rng = None if cfg.mode == "greedy" else state.rng
        size = image.size
        if state.refine and state.focus is not None:
            parent = state.regions[state.focus]
            boxes = sub_regions(parent.box, cfg.sub_region_scale, size)
            scores = [self.oracle.drill(image, b, case.question, case=case, rng=state.rng) for b in boxes]
            pick = nucleus_choice(scores, rng, cfg.temperature, cfg.p0)
            box, after = boxes[pick], scores[pick]
            before = parent.confidence
            text = narrator.pick(Narrator.REFINE, part=part_name(parent.box, box), box=fmt_box(box), c=before)
            child = RegionBelief(
                box,
                before,
                drilled=after,
                label=parent.label,
                parent_box=parent.region_box,
                size_estimate=parent.size_estimate,
            )
            state.regions.append(child)
            index = len(state.regions) - 1
        else:
            if not state.regions or all(r.drilled is not None for r in state.regions):
                self._merge(state, self._oracle_scan(context, state))
            undrilled = [i for i, r in enumerate(state.regions) if r.drilled is None]
            if not undrilled:
                state.stop = True
                return None, ""
            choice = nucleus_choice([state.regions[i].scanned for i in undrilled], rng, cfg.temperature, cfg.p0)
            index = undrilled[choice]
            region = state.regions[index]
            box, before = region.box, region.scanned
            after = self.oracle.drill(image, box, case.question, case=case, rng=state.rng)
            region.drilled = after
            top = max(state.regions[i].scanned for i in undrilled)
            templates = Narrator.DRILL if before >= top else Narrator.DRILL_SAMPLED
            text = narrator.pick(templates, box=fmt_box(box), where=where_phrase(box, size), c=before)
        gain = information_gain(before, after, cfg.eps)
        state.last_event = DrillEvent(box, before, after, gain)
        state.focus = index
        if after >= cfg.xi:
            state.stop = True
        elif gain >= cfg.delta:
            state.refine, state.mode = True, "drill"
        else:
            state.refine = False
            candidates_left = any(r.drilled is None for r in state.regions)
            next_candidate = cfg.low_gain == "next" and candidates_left
            state.mode = "drill" if cfg.mode == "drill_only" or next_candidate else "scan"
        return Action.drill(_round_box(box)), text

    def _answer(self, context: EpisodeContext, state: GRNState, narrator: Narrator, prefix: str) -> str:
        evidence = summarise(state.regions, self.config)
        answer, why = derive_answer(context.case, evidence, self.oracle, context.image, self.config, state.rng)
        state.answered = answer
        if evidence.best is None:
            summary = "no candidate region stood out"
        else:
            best = evidence.best
            kind = "drilled" if best.drilled is not None else "scanned"
            summary = (
                f"{len(evidence.regions)} region(s) examined, {len(evidence.positives)} convincing; best "
                f"{where_phrase(best.box, context.image.size)} at {fmt_box(best.box)} "
                f"({kind} confidence {best.confidence:.2f})"
            )
        text = narrator.pick(Narrator.ANSWER, summary=summary, why=f"{why}, so the answer is {answer}")
        context.state["record_info"] = {"answer": answer, "why": why, "summary": summary}
        return render_turn(Action.final_answer(answer), join_notes(prefix, text))

    # -- random trajectories -------------------------------------------------------------------------

    def _shadow_plan(self, context: EpisodeContext, episode_seed: int) -> list[tuple[str, int]]:
        """Run the full GRN+CVS expert silently to learn this episode's action names and boxes per action."""
        shadow = ExpertAgent(self.oracle, self.config.model_copy(update={"mode": "full"}))
        ghost = EpisodeContext(
            episode_id=context.episode_id,
            case=context.case,
            image=context.image,
            messages=[],
            step=0,
            max_steps=context.max_steps,
            state={"seed": episode_seed},
            box_format=context.box_format,
        )
        plan: list[tuple[str, int]] = []
        for _ in range(context.max_steps + 1):
            shadow._turn(ghost)
            grn: GRNState = ghost.state["grn"]
            if grn.answered is not None:
                break
            last = grn.calls[-1]
            plan.append((last.action, last.n_boxes))
        return plan

    def _random_step(self, context: EpisodeContext, state: GRNState) -> tuple[Action | None, str]:
        """Replay the shadow plan's next action with boxes of random place and size (log-uniform side)."""
        if state.plan is None or state.tool_steps >= len(state.plan):
            state.stop = True
            return None, ""
        name, count = state.plan[state.tool_steps]
        width, height = context.image.size
        low, high = self.config.random_box_range
        boxes: list[Box] = []
        for _ in range(count):
            side = min(width, height) * math.exp(state.rng.uniform(math.log(low), math.log(high)))
            x = float(state.rng.uniform(0, width - side))
            y = float(state.rng.uniform(0, height - side))
            boxes.append(_round_box((x, y, x + side, y + side)))
        case = context.case
        for box in boxes:
            confidence = self.oracle.drill(context.image, box, case.question, case=case, rng=state.rng)
            state.regions.append(RegionBelief(box, confidence, drilled=confidence, size_estimate=None))
        if state.tool_steps + 1 >= len(state.plan):
            state.stop = True
        listing = ", ".join(fmt_box(b) for b in boxes)
        action = Action.drill(boxes[0]) if name == "drill" else Action.scan(*boxes)
        verb = "Zooming into" if name == "drill" else "Scanning"
        return action, f"{verb} {listing}, chosen at random."


def _round_box(box: Box) -> Box:
    """Whole-pixel box, at least one pixel wide and high."""
    x1, y1 = math.floor(box[0]), math.floor(box[1])
    return (float(x1), float(y1), float(max(x1 + 1, math.ceil(box[2]))), float(max(y1 + 1, math.ceil(box[3]))))


def make_expert(oracle: str = "annotation", mode: str = "full", **config: Any) -> ExpertAgent:
    """Build an expert by oracle name and mode; ``config`` overrides other :class:`ExpertConfig` fields."""
    if mode not in EXPERT_MODES:
        import difflib

        close = difflib.get_close_matches(mode, EXPERT_MODES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown expert mode {mode!r}.{hint} Choose one of {', '.join(EXPERT_MODES)}")
    try:
        expert_config = ExpertConfig(mode=mode, **config)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(f"invalid expert configuration: {exc}") from None
    return ExpertAgent(make_oracle(oracle), expert_config)
