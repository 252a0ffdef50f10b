"""The ground stage's examples: what a where- or what-question and its answer look like (no torch, no model).

Real policies (Qwen2.5-VL, SmolVLM) come pretrained on grounding data: they can say where an object is and
what a crop shows. The tiny models built here start from random weights, and expert demonstrations teach
seeing too slowly: one box and one yes/no per trajectory of ~400 tokens (docs/learn_to_look.md measures
it). This stage is the cheap stand-in for that pretraining, on the training split's own annotations:

- ``where``: the overview and "Where are the round objects?" -> the boxes of every visible candidate
  (gold regions and lookalikes), written in the environment's box format, left to right;
- ``what``: a drill view of one candidate (the box jittered like a policy's drill) and "Is there an
  abnormality in this region?" -> ``yes`` for a gold region, ``no`` for a lookalike: the words a closed
  question is answered with, so reading a crop transfers to the policy's final answer.

Each example opens like an episode (the environment's system prompt, then one image and the question), so
the image sits where the policy will later look at it; it holds one image and a short answer, so a step
sees many images. Examples are drawn from a pool of training cases rendered once; the held-out split is
never touched. ``sft.ground_examples`` keeps some of them in every SFT step (co-training), so learning the
protocol does not wash out what the model learned to see. The stage itself (pool, step, held-out scores) is
:mod:`medeyes.training.stages.ground`; this module is apart because experiments and the expert's brief
reasoning use the example forms without the trainer.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from medeyes.training.stage_config import GroundShape, GroundTask
from medeyes_env import views
from medeyes_env.cases import Box, Case
from medeyes_env.env import EnvConfig, MedEyesEnv
from medeyes_env.protocol import Action, protocol_instructions, render_turn
from medeyes_env.rewards import box_iou

BRIEF_REASONING = {"scan": "compare candidates", "drill": "look closer", "answer": "conclude"}
"""The two-word reasoning of ``expert.reasoning="brief"`` and of episode-shaped grounding, by action."""
WHERE_QUESTION = "Where are the round objects? Give their boxes."
WHAT_QUESTION = "Is there an abnormality in this region?"


def candidates(case: Case) -> list[tuple[Box, str]]:
    """What a grounding example may point at, left to right: gold regions ("yes") and lookalikes ("no")."""
    found = [(r.box, "yes") for r in case.regions] + [(r.box, "no") for r in case.lookalikes]
    return sorted(found, key=lambda item: (item[0][0], item[0][1]))


def grounding_examples(
    case: Case,
    env: EnvConfig,
    tasks: tuple[GroundTask, ...],
    rng: np.random.Generator,
    jitter: float,
    what_share: float = 1.0,
    system_prompt: bool = False,
    as_turns: bool = False,
    empty_share: float = 0.0,
    bilateral: bool = False,
    what_pairs: bool = False,
) -> list[tuple[list[dict[str, Any]], str]]:
    """The grounding examples of one case as ``(messages, answer)``; images as the environment shows them.

    ``what_pairs``: a what-example shows the candidate's drill view and the drill view of the same box on the
    other side (empty tissue), in random order, as a policy that drilled both sides has them before it answers.

    A where-example always; a what-example with probability ``what_share`` (reading a crop is learned from
    fewer examples than placing a box). ``as_turns`` writes the answers as the episode's own turns (the scan
    turn over the boxes; the answer turn with ``yes``/``no``): the same short contexts, but the model learns
    to say what it sees with the tokens, at the positions, an episode uses (bare `` yes`` after the role
    marker is another token than ``yes`` inside ``<answer>``, and what is learned on one does not carry over).
    """
    image = case.load_image()
    objects = candidates(case)
    system = (
        protocol_instructions(
            image.size[0],
            image.size[1],
            env.max_steps + 1,
            env.limits,
            style=env.instructions,
            box_format=env.box_format,
        )
        if system_prompt
        else None
    )
    examples: list[tuple[list[dict[str, Any]], str]] = []
    if "where" in tasks:
        where = [box for box, _ in objects]
        if bilateral:
            where = sorted([*where, *views.mirrored_boxes(where, image.size[0])], key=lambda b: (b[0], b[1]))
        answer = ", ".join(env.box_format.encode(box, image.size) for box in where) or "none"
        if as_turns and where:
            answer = _turn(Action.scan(*where), env, image.size)
        examples.append((_messages(system, views.overview(image, env.view_size), WHERE_QUESTION, answer), answer))
    if "what" in tasks and objects and rng.random() < what_share:
        box, label = objects[int(rng.integers(len(objects)))]
        clamped = _jitter(box, image.size, jitter, rng)
        if clamped is not None:
            view, _ = views.drill_view(image, clamped, env.view_size, env.drill_min_side)
            answer = _turn(Action.final_answer(label), env, image.size) if as_turns else label
            shown = _with_other_side(view, clamped, objects, image, env, rng) if what_pairs else view
            examples.append((_messages(system, shown, WHAT_QUESTION, answer), answer))
    # drawn only when asked for, so a run without it keeps the same random draws
    if "what" in tasks and objects and empty_share > 0 and rng.random() < empty_share:
        empty = empty_box([box for box, _ in objects], image.size, rng)
        if empty is not None:
            view, _ = views.drill_view(image, empty, env.view_size, env.drill_min_side)
            answer = _turn(Action.final_answer("no"), env, image.size) if as_turns else "no"
            examples.append((_messages(system, view, WHAT_QUESTION, answer), answer))
    return examples


def _with_other_side(
    view: Any, box: Box, objects: list[tuple[Box, str]], image: Any, env: EnvConfig, rng: np.random.Generator
) -> Any:
    """``view`` and the drill view of ``box``'s mirror in random order; ``view`` alone if the mirror holds an object."""
    mirror = views.mirrored_boxes([box], image.size[0])
    if not mirror or any(box_iou(mirror[0], other) > 0.0 for other, _ in objects):
        return view
    other, _ = views.drill_view(image, mirror[0], env.view_size, env.drill_min_side)
    return [view, other] if rng.random() < 0.5 else [other, view]


def empty_box(objects: list[Box], size: tuple[int, int], rng: np.random.Generator, tries: int = 20) -> Box | None:
    """A box the size of the largest candidate that touches none of them (None if 20 draws all overlap)."""
    side = max(max(b[2] - b[0], b[3] - b[1]) for b in objects)
    width, height = size
    for _ in range(tries):
        x, y = rng.uniform(0, max(1.0, width - side)), rng.uniform(0, max(1.0, height - side))
        box = (x, y, x + side, y + side)
        if all(box_iou(box, b) == 0.0 for b in objects):
            return box
    return None


def episode_grounding_examples(
    case: Case,
    env: EnvConfig,
    tasks: tuple[GroundTask, ...],
    rng: np.random.Generator,
    jitter: float,
    what_share: float = 1.0,
) -> list[tuple[list[dict[str, Any]], str]]:
    """The grounding examples of one case shaped exactly like the turns of an episode that decide it.

    The probe shape asks in its own words, and the model answers with tokens an episode never uses (`` yes``
    after the role marker, not ``yes`` inside ``<answer>``), so what it learns there does not carry over. Here
    the environment itself renders the context:

    - ``where``: the episode's opening (system prompt, overview, the case's question) -> the scan turn over
      every candidate, as the brief expert writes it;
    - ``what``: scan and drill of one candidate (jittered like a policy's box), the environment's views and
      feedback -> the answer turn with the case's gold answer. Only the last turn is a target.

    Only questions about regions give examples: the expert answers global ones (modality) without looking.
    """
    from medeyes.agents.expert.answers import REGION_FAMILIES, question_family

    objects = candidates(case)
    # a global question (modality) is answered at once in the expert's episodes: no look to learn from it
    if not objects or question_family(case).lower() not in REGION_FAMILIES:
        return []
    size = case.load_image().size
    game = MedEyesEnv(source="phantom", config=env)  # the source is unused: every reset names its case
    examples: list[tuple[list[dict[str, Any]], str]] = []
    if "where" in tasks:
        game.reset(options={"case": case})
        answer = _turn(Action.scan(*(box for box, _ in objects)), env, size)
        examples.append((_with_answer(game.chat_messages(), answer), answer))
    if "what" in tasks and rng.random() < what_share:
        box, _ = objects[int(rng.integers(len(objects)))]
        jittered = _jitter(box, size, jitter, rng)
        if jittered is not None:
            game.reset(options={"case": case})
            game.step(_turn(Action.scan(jittered), env, size))
            game.step(_turn(Action.drill(jittered), env, size))
            answer = _turn(Action.final_answer(case.answer), env, size)
            examples.append((_with_answer(game.chat_messages(), answer), answer))
    return examples


def shaped_examples(
    case: Case,
    env: EnvConfig,
    shape: GroundShape,
    tasks: tuple[GroundTask, ...],
    rng: np.random.Generator,
    jitter: float,
    what_share: float = 1.0,
    system_prompt: bool = False,
    empty_share: float = 0.0,
    bilateral: bool = False,
    what_pairs: bool = False,
) -> list[tuple[list[dict[str, Any]], str]]:
    """The grounding examples of one case in ``shape`` (``ground.shape``): the one place that dispatches on it."""
    if shape == "episode":
        return episode_grounding_examples(case, env, tasks, rng, jitter, what_share)
    turns = shape == "turns"
    return grounding_examples(
        case, env, tasks, rng, jitter, what_share, system_prompt, turns, empty_share, bilateral, what_pairs
    )


def _turn(action: Action, env: EnvConfig, size: tuple[int, int]) -> str:
    """The turn the brief expert writes for ``action``."""
    return render_turn(action, BRIEF_REASONING[action.name], env.box_format, size)


def _jitter(box: Box, size: tuple[int, int], jitter: float, rng: np.random.Generator) -> Box | None:
    side = max(box[2] - box[0], box[3] - box[1])
    shifted = np.asarray(box, dtype=float) + rng.normal(0.0, jitter * side, size=2).repeat(2)[[0, 2, 1, 3]]
    clamped = views.clamp_box(tuple(float(v) for v in shifted), size)
    return clamped if clamped[2] > clamped[0] and clamped[3] > clamped[1] else None


def _with_answer(messages: list[dict[str, Any]], answer: str) -> list[dict[str, Any]]:
    return [*messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def _messages(system: str | None, image: Any, question: str, answer: str) -> list[dict[str, Any]]:
    """One user turn with ``image`` (one image, or a list shown in order) and ``question``, then ``answer``."""
    opening = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    shown = [{"type": "image", "image": one} for one in (image if isinstance(image, list) else [image])]
    return [
        *opening,
        {"role": "user", "content": [*shown, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


_FIRST_BOX = re.compile(r'"(?:\s*<loc\d{2}>){4}\s*"|\[[^\[\]]{0,80}\]')


def parse_where_answer(text: str, env: EnvConfig, image_size: tuple[int, int]) -> list[Box]:
    """The first box of a where-answer (in the environment's box format), in pixels; [] when none parses.

    The answer has no closing tag to stop at, so a model may run on after it: only the first box counts.
    """
    from medeyes_env.protocol import parse_turn

    # an episode-shaped answer is a whole scan turn: read it as the environment would
    end = text.find("</action>")
    if end >= 0:
        turn = parse_turn(text[: end + len("</action>")], image_size, env.limits, env.box_format)
        if turn.action is not None and turn.action.boxes:
            return list(turn.action.boxes)
    match = _FIRST_BOX.search(text)
    if match is None:
        return []
    turn = parse_turn(
        f'<reasoning>r</reasoning><action>{{"name": "scan", "boxes": [{match.group(0)}]}}</action>',
        image_size,
        env.limits,
        env.box_format,
    )
    return list(turn.action.boxes) if turn.action is not None else []


def grounding_scores(
    cases: list[Case], where_texts: list[str], what_texts: list[str], what_labels: list[str], env: EnvConfig
) -> dict[str, float]:
    """Held-out grounding: hit rate (the first box holds a candidate's centre), best IoU, what-accuracy.

    >>> from medeyes_env.cases import AnswerType, Region
    >>> case = Case(id="c", question="q", answer="yes", answer_type=AnswerType.CLOSED, source="s",
    ...             regions=(Region(box=(0.0, 0.0, 32.0, 32.0), label="lesion"),), image_size=(512, 512))
    >>> env = EnvConfig(box_format={"kind": "loc", "bins": 16})
    >>> grounding_scores([case], ['"<loc00><loc00><loc01><loc01>"'], ["yes"], ["yes"], env)
    {'ground/hit': 1.0, 'ground/iou': 1.0, 'ground/what': 1.0}
    """
    from medeyes_env.rewards import box_iou

    hits, ious = [], []
    for case, text in zip(cases, where_texts, strict=True):
        gold = [box for box, _ in candidates(case)]
        if not gold:
            continue
        boxes = parse_where_answer(text, env, case.image_size or (1, 1))
        first = boxes[0] if boxes else None
        hits.append(
            first is not None
            and any(
                first[0] <= (g[0] + g[2]) / 2 <= first[2] and first[1] <= (g[1] + g[3]) / 2 <= first[3] for g in gold
            )
        )
        ious.append(max((box_iou(b, g) for b in boxes for g in gold), default=0.0))
    # no stop token: "mimicimic..." still says mimic first
    right = [_said(text).startswith(_said(label)) for text, label in zip(what_texts, what_labels, strict=True)]
    out = {"ground/hit": float(np.mean(hits)) if hits else 0.0, "ground/iou": float(np.mean(ious)) if ious else 0.0}
    if right:
        out["ground/what"] = float(np.mean(right))
    return out


_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)


def _said(text: str) -> str:
    """What a what-answer says: the ``<answer>`` of an episode-shaped turn, else the text itself."""
    match = _ANSWER.search(text)
    return (match.group(1) if match else text).strip().lower()
