"""Readout probe: does a model tell lesion from mimic in the drill view, and with which words, in which context.

The ground stage's held-out score asks in its own short context and its own words. This probe scores the
same crops in four settings, by the AUC of the logit margin ``yes - no`` at the answer (1.0: the margin
separates lesions from mimics perfectly; 0.5: no signal; below 0.5: signal with the wrong sign):

- ``probe``: drill view + "Is there an abnormality in this region?" -> bare `` yes`` (the probe's words);
- ``episode_bare``: the whole episode (overview, scan turn, montage, drill turn, drill view, the
  environment's feedback) -> bare `` yes``;
- ``episode_turn``: the same context -> ``<reasoning>conclude</reasoning> <answer>yes`` (the policy's words);
- ``probe_turn``: the probe context -> the policy's words.

    python experiments/episode_probe.py --model runs/x/g1/final runs/x/g7/final --instructions none
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch

from medeyes.models.chat import content_text
from medeyes.models.episodes import TurnTokens, collate, tokenize_episode
from medeyes.models.factory import load_policy_model
from medeyes.training.config import preset
from medeyes.training.stages.ground_examples import episode_grounding_examples, grounding_examples
from medeyes_env.sources import open_cases


def margin(model: Any, processor: Any, messages: list[dict[str, Any]], answer: str) -> float:
    """Logit of yes minus no at the first yes/no token of ``answer``, given everything before it."""
    tok = processor.tokenizer
    messages = [*messages[:-1], {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    turns = [TurnTokens(content_text(m)) for m in messages if m["role"] == "assistant"]
    episode = tokenize_episode(messages, turns, processor)
    with torch.no_grad():
        logits = model(**collate([episode], tok.pad_token_id or 0).model_inputs()).logits[0]
    start, end = episode.turn_spans[-1]
    pairs = [tuple(tok.convert_tokens_to_ids(w) for w in p) for p in (("Ġyes", "Ġno"), ("yes", "no"))]
    ids = episode.input_ids.tolist()
    for p in range(start, end):
        for yes, no in pairs:
            if ids[p] in (yes, no):
                return float(logits[p - 1, yes] - logits[p - 1, no])
    raise ValueError(f"no yes/no token in {answer!r}")


def auc(margins: list[float], positive: list[bool]) -> float:
    x, y = np.asarray(margins), np.asarray(positive)
    return float(np.mean(x[y][:, None] > x[~y][None, :]) + 0.5 * np.mean(x[y][:, None] == x[~y][None, :]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", required=True)
    parser.add_argument("--instructions", default="none", help="the episode's system prompt style (env.instructions)")
    parser.add_argument("--start", type=int, default=1000, help="first held-out test case")
    parser.add_argument("--n", type=int, default=160)
    args = parser.parse_args()
    cfg = preset("cpu-default")
    env = cfg.env.model_copy(update={"instructions": args.instructions})
    source = open_cases(cfg.data, cfg.data_options.model_dump())
    rng = np.random.default_rng(0)
    cases = []
    for index in range(args.start, args.start + args.n):
        case = source.case("test", index)
        episode = episode_grounding_examples(case, env, ("what",), rng, 0.15)
        probe = grounding_examples(case, env, ("what",), rng, 0.15, as_turns=True)
        if episode and probe:
            cases.append((case.answer == "yes", episode[0], probe[0]))
    for model_dir in args.model:
        model, processor = load_policy_model(model_dir)
        model.eval()
        scores: dict[str, list[float]] = {k: [] for k in ("probe", "episode_bare", "episode_turn", "probe_turn")}
        for positive, (episode, turn_answer), (probe, _) in cases:
            bare = "yes" if positive else "no"
            scores["probe"].append(margin(model, processor, probe, bare))
            scores["probe_turn"].append(margin(model, processor, probe, turn_answer))
            scores["episode_bare"].append(margin(model, processor, episode, bare))
            scores["episode_turn"].append(margin(model, processor, episode, turn_answer))
        labels = [positive for positive, _, _ in cases]
        row = {k: round(auc(v, labels), 3) for k, v in scores.items()}
        print(json.dumps({"model": model_dir, "instructions": args.instructions, "cases": len(cases), **row}))


if __name__ == "__main__":
    main()
