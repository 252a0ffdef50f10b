"""The GRN + CVS expert: gold validation, the state machine, CVS sampling, ablations, and honesty."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from medeyes.agents.base import Agent, EpisodeContext
from medeyes.agents.expert.agent import ExpertAgent, make_expert, nucleus_choice, sub_regions
from medeyes.agents.expert.answers import question_family
from medeyes.agents.expert.config import ExpertConfig
from medeyes.agents.expert.oracles.base import ScoredRegion
from medeyes.rollout import RolloutConfig, run_rollout
from medeyes.rollout_summary import summarize
from medeyes_env.cases import Case, Region
from medeyes_env.env import MedEyesEnv
from medeyes_env.errors import ConfigError
from medeyes_env.protocol import parse_turn
from medeyes_env.rewards import grounding_reward
from medeyes_env.sources import open_source
from medeyes_env.sources.phantom.config import FAMILIES


class ListSource:
    """A finite source over given cases (so a test can pick which phantom cases run)."""

    name = "list"

    def __init__(self, cases):
        self.cases = list(cases)

    def size(self, split):
        return len(self.cases)

    def case(self, split, index):
        return self.cases[index]


def phantom_cases_by_family(per_family: int, split: str = "test") -> list[Case]:
    source = open_source("phantom")
    chosen: dict[str, list[Case]] = {f: [] for f in FAMILIES}
    index = 0
    while any(len(v) < per_family for v in chosen.values()):
        case = source.case(split, index)
        family = case.meta["family"]
        if len(chosen[family]) < per_family:
            chosen[family].append(case)
        index += 1
    return [case for cases in chosen.values() for case in cases]


def test_expert_is_an_agent():
    assert isinstance(make_expert(), Agent)


def test_perfect_oracle_earns_full_accuracy_on_every_phantom_family():
    """Gold validation (STYLE.md): a noise-free oracle must answer every family the expert reads correctly."""
    cases = phantom_cases_by_family(per_family=4)
    result = run_rollout(make_expert("perfect"), ListSource(cases), RolloutConfig(n=len(cases), samples_per_case=1))
    summary = summarize(result.records)
    wrong = [(r.family, r.question, r.gold_answer, r.final_answer) for r in result.records if not r.correct]
    assert not wrong, wrong
    assert set(summary.accuracy_by_family) == set(FAMILIES)
    assert summary.mean_components["grammar"] == 1.0
    positives = [r for r in result.records if r.gold_boxes and r.family != "modality"]
    # The perfect expert drills the gold box; best_iou scores it against the lesion's disc inside the box.
    assert all(grounding_reward(r.explored_boxes, r.gold_boxes) == 1.0 for r in positives)
    for record in positives:
        on_shapes = grounding_reward(record.explored_boxes, record.gold_regions)
        # A small lesion's padded box is mostly corners: the disc fills about 0.3 to 0.8 of it.
        assert record.reward_components["best_iou"] == pytest.approx(on_shapes) and on_shapes > 0.25


class ScriptedOracle:
    """Two candidates A and B; drill confidences from a table (a small injected fake to drive GRN)."""

    name = "scripted"
    A, B = (10.0, 10.0, 60.0, 60.0), (120.0, 120.0, 170.0, 170.0)

    def __init__(self, drill_a: float, drill_b: float = 0.1, sub: float | None = None):
        self.drill_a, self.drill_b, self.sub = drill_a, drill_b, sub
        self.drills: list[tuple] = []

    def scan(self, image, question, *, case=None, rng=None):
        return [ScoredRegion(self.A, 0.6), ScoredRegion(self.B, 0.4)]

    def drill(self, image, box, question, *, case=None, rng=None):
        self.drills.append(tuple(box))
        if tuple(box) == self.A:
            return self.drill_a
        if tuple(box) == self.B:
            return self.drill_b
        inside_a = box[0] >= self.A[0] - 1 and box[2] <= self.A[2] + 1
        return (self.sub if self.sub is not None else self.drill_a) if inside_a else 0.0

    def read(self, image, question, options, *, focus=None, case=None, rng=None):
        return None

    def describe(self):
        return {"name": self.name}


def _episode(agent: ExpertAgent, case_answer: str = "yes") -> list:
    case = Case(
        id="s/1",
        question="Is there a nodule?",
        answer=case_answer,
        answer_type="closed",
        source="s",
        regions=(Region(box=ScriptedOracle.A),),
        image_size=(200, 200),
    )
    from PIL import Image

    case = case.with_image_factory(lambda: Image.new("RGB", (200, 200), (90, 90, 90)))
    env = MedEyesEnv(ListSource([case]), split="test")
    env.reset(seed=0, options={"case_index": 0})
    context = EpisodeContext(0, case, env.image, [], 0, env.config.max_steps, state={"seed": 1})
    actions = []
    done = False
    while not done:
        (turn,) = agent.act([context])
        parsed = parse_turn(turn.text, env.image.size)
        assert parsed.well_formed, turn.text
        actions.append((parsed.action.name, parsed.action.boxes, parsed.reasoning))
        _, _, terminated, truncated, _ = env.step(turn.text)
        done = terminated or truncated
    return actions


def test_grn_answers_once_a_drill_reaches_xi():
    oracle = ScriptedOracle(drill_a=0.9)
    actions = _episode(ExpertAgent(oracle, ExpertConfig(mode="greedy")))
    assert [a[0] for a in actions] == ["scan", "drill", "answer"]
    assert actions[0][1] == (ScriptedOracle.A, ScriptedOracle.B), "the scan shows candidates, most confident first"
    assert actions[1][1] == (ScriptedOracle.A,)
    assert actions[2][2].endswith("so the answer is yes.")


def test_grn_keeps_drilling_a_sub_region_while_the_gain_reaches_delta():
    # 0.6 -> 0.8 is a gain of 33% >= delta 0.15 but below xi: drill deeper, into a sub-region of A.
    oracle = ScriptedOracle(drill_a=0.8, sub=0.95)
    actions = _episode(ExpertAgent(oracle, ExpertConfig(mode="greedy")))
    assert [a[0] for a in actions] == ["scan", "drill", "drill", "answer"]
    (sub,) = actions[2][1]
    assert sub in [tuple(float(round(v)) for v in b) for b in sub_regions(ScriptedOracle.A, 0.6, (200, 200))]
    assert "0.60 to 0.80" in actions[2][2] or "0.60 -> 0.80" in actions[2][2], actions[2][2]


def test_grn_returns_to_scanning_when_the_gain_is_below_delta():
    # 0.6 -> 0.65 is a gain of 8% < delta: back to scan mode, which then offers B.
    oracle = ScriptedOracle(drill_a=0.65, drill_b=0.1)
    actions = _episode(ExpertAgent(oracle, ExpertConfig(mode="greedy")))
    assert [a[0] for a in actions] == ["scan", "drill", "scan", "drill", "answer"]
    assert actions[2][1] == (ScriptedOracle.B,), "the rescan shows what has not been drilled"
    assert actions[3][1] == (ScriptedOracle.B,)


def test_delta_is_the_switch():
    oracle = ScriptedOracle(drill_a=0.65, sub=0.7)
    actions = _episode(ExpertAgent(oracle, ExpertConfig(mode="greedy", delta=0.05)))
    assert [a[0] for a in actions][:3] == ["scan", "drill", "drill"]


def test_ablation_modes_use_only_their_actions():
    oracle = ScriptedOracle(drill_a=0.65, drill_b=0.1)
    scan_only = _episode(ExpertAgent(oracle, ExpertConfig(mode="scan_only")))
    drill_only = _episode(ExpertAgent(oracle, ExpertConfig(mode="drill_only", seed=3)))
    assert {a[0] for a in scan_only[:-1]} == {"scan"} and len(scan_only) == 5
    assert {a[0] for a in drill_only[:-1]} == {"drill"}
    assert scan_only[-1][0] == drill_only[-1][0] == "answer"


def test_random_mode_replays_the_expert_lengths_with_random_boxes():
    cases = phantom_cases_by_family(per_family=1)
    source = ListSource(cases)
    config = RolloutConfig(n=len(cases), samples_per_case=2, seed=4)
    full = run_rollout(make_expert("annotation", "full"), source, config).records
    rand = run_rollout(make_expert("annotation", "random"), source, config).records
    by_id = {r.trajectory_id: r for r in full}
    for record in rand:
        twin = by_id[record.trajectory_id]
        assert [s.action.name for s in record.steps] == [s.action.name for s in twin.steps]
        assert [len(s.action.boxes) for s in record.steps] == [len(s.action.boxes) for s in twin.steps]
    assert summarize(rand).mean_best_iou < summarize(full).mean_best_iou


def test_nucleus_sampling_keeps_the_top_mass_and_renormalises():
    rng = np.random.default_rng(0)
    confidences = [0.9, 0.8, 0.1]
    # softmax([0.9, 0.8, 0.1] / 0.2) = [0.526, 0.319, 0.009...]: p0 = 0.8 keeps the first two only.
    draws = Counter(nucleus_choice(confidences, rng, 0.2, 0.8) for _ in range(4000))
    assert set(draws) == {0, 1}
    logits = np.array(confidences[:2]) / 0.2
    expected = np.exp(logits) / np.exp(logits).sum()
    assert draws[0] / 4000 == pytest.approx(expected[0], abs=0.03)
    assert nucleus_choice(confidences, None, 0.2, 0.8) == 0, "without CVS: argmax"
    assert Counter(nucleus_choice(confidences, rng, 0.2, 0.01) for _ in range(100)) == Counter({0: 100})
    with pytest.raises(ValueError, match="at least one"):
        nucleus_choice([], rng, 1.0, 0.9)


def test_cvs_trajectories_differ_and_greedy_does_not():
    cases = phantom_cases_by_family(per_family=1)[:4]
    source = ListSource(cases)
    full = run_rollout(make_expert("annotation"), source, RolloutConfig(n=4, seed=2)).records
    assert len(full) == 4 * 6, "N_expert = 6 trajectories per case by default"
    assert summarize(full).path_diversity > 0.3
    greedy = make_expert("annotation", "greedy")
    assert greedy.samples_per_case == 1


def test_reasoning_is_templated_from_what_the_oracle_saw_and_varies():
    cases = [c for c in phantom_cases_by_family(per_family=3) if c.meta["family"] == "presence"]
    records = run_rollout(make_expert("annotation"), ListSource(cases), RolloutConfig(n=3, samples_per_case=2)).records
    texts = [s.reasoning for r in records for s in r.steps]
    assert all(texts) and len(set(texts)) == len(texts), "every step reads differently"
    drills = [s for r in records for s in r.steps if s.action.name == "drill"]
    assert any("confidence" in s.reasoning and "[" in s.reasoning for s in drills)


def test_the_expert_never_reads_the_gold_answer():
    """Region questions: changing case.answer (the same image) cannot change what the expert answers."""
    cases = [c for c in phantom_cases_by_family(per_family=1) if c.meta["family"] in ("presence", "count", "size")]
    flipped = []
    for case in cases:
        other = {"yes": "no", "no": "yes"}.get(case.answer) or ("small" if case.answer != "small" else "large")
        if case.meta["family"] == "count":
            other = str(int(case.answer) + 1)
        twin = case.model_copy(update={"answer": other})
        flipped.append(twin.with_image_factory(case.load_image))
    for oracle in ("image", "annotation"):  # the annotation oracle reads gold REGIONS (unchanged), never the answer
        config = RolloutConfig(n=len(cases), samples_per_case=1, seed=1)
        a = run_rollout(make_expert(oracle), ListSource(cases), config).records
        b = run_rollout(make_expert(oracle), ListSource(flipped), config).records
        assert [r.final_answer for r in a] == [r.final_answer for r in b]
        assert [r.steps[-1].text for r in a] == [r.steps[-1].text for r in b]


def test_question_family_falls_back_to_the_wording():
    def case(question, answer_type="closed", answer="yes", options=()):
        return Case(id="x", question=question, answer=answer, answer_type=answer_type, options=options, source="s")

    assert question_family(case("How many nodules are there?", "open", "2")) == "count"
    assert question_family(case("Where is the lesion?", "choice", "left", ("left", "right"))) == "location"
    assert question_family(case("Is there an abnormality?")) == "presence"


def test_invalid_expert_settings_are_refused():
    with pytest.raises(ConfigError, match=re.escape("unknown expert mode 'scan-only'. Did you mean 'scan_only'?")):
        make_expert("annotation", "scan-only")
    with pytest.raises(ConfigError, match="invalid expert configuration"):
        make_expert("annotation", p0=0.0)


def test_global_questions_answer_at_once_and_region_questions_still_look():
    cases = phantom_cases_by_family(per_family=3)
    runs = {}
    for setting in ("look", "answer"):
        expert = ExpertAgent("perfect", ExpertConfig(global_questions=setting, n_expert=1))
        runs[setting] = run_rollout(expert, ListSource(cases), RolloutConfig(n=len(cases), samples_per_case=1)).records
    looked = 0
    for look, answer in zip(runs["look"], runs["answer"], strict=True):
        if look.family == "modality":
            assert [step.action.name for step in answer.steps] == ["answer"] and answer.correct
            looked += len(look.steps) > 1
        else:  # region questions are untouched by the setting
            assert [s.text for s in look.steps] == [s.text for s in answer.steps]
    assert looked, "with global_questions=look the expert uses tools on some modality question"
