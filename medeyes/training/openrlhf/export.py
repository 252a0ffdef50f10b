"""The OpenRLHF backend, user side: the run's configuration and the export of everything the run reads.

:func:`export_openrlhf_data` writes into one directory (put it on a filesystem every node sees):
``prompts.jsonl`` (one row per training episode group: chat messages with an ``<image>`` tag, the overview
image path, and a JSON ``label`` naming the case), ``eval.jsonl`` (held-out cases), ``images/`` (overview PNGs),
``expert.jsonl`` (the expert trajectories of the off-policy stream, as text turns), ``medeyes_openrlhf.json``
(:class:`~medeyes.training.openrlhf.config.BackendConfig`) and ``medeyes_agent.py`` (the
``--train.agent_func_path`` file). :mod:`medeyes.training.openrlhf.launch` turns the same
:class:`OpenRLHFConfig` into the command line.

OpenRLHF's optimizer steps are ``len(prompts) * n_samples_per_prompt // train_batch_size``; the export writes
``grpo.steps * grpo.prompts_per_step`` prompt rows and the command sets ``--train.batch_size`` to one
rollout batch, so the run takes exactly ``grpo.steps`` optimizer steps, one per rollout batch (on-policy).
Only the ``grpo`` stage runs on OpenRLHF; an ``sft`` warm start is the single-process trainer's job.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from medeyes.training.openrlhf.config import (
    AGENT_FILE,
    BACKEND_FILE,
    EVAL_FILE,
    EXPERT_FILE,
    IMAGES_DIR,
    PROMPTS_FILE,
    BackendConfig,
    CaseLabel,
    OpenRLHFConfig,
)
from medeyes.training.openrlhf.episode import open_case_source
from medeyes.training.openrlhf.replay import ExpertCase, ExpertTrajectory
from medeyes_env.errors import ConfigError

_AGENT_TEMPLATE = '''"""MedEyes agent for OpenRLHF (medeyes openrlhf export): --train.agent_func_path this file."""

from medeyes.training.openrlhf.agent import make_agent_executor

AgentExecutor = make_agent_executor({config!r})
'''


# ================================================================================================ export


class ExportSummary(BaseModel):
    """What :func:`export_openrlhf_data` wrote."""

    directory: Path = Field(description="The export directory.")
    prompt_rows: int = Field(description="Rows of prompts.jsonl (= grpo.steps x prompts_per_step).")
    train_cases: int = Field(description="Distinct training cases the rows cycle over.")
    eval_rows: int = Field(description="Rows of eval.jsonl.")
    expert_cases: int = Field(default=0, description="Training cases with at least one expert trajectory.")
    expert_trajectories: int = Field(default=0, description="Expert trajectories written.")
    files: list[str] = Field(default_factory=list, description="Files written, relative to the directory.")


def _case_rows(
    config: OpenRLHFConfig, split: str, indices: Sequence[int], images_dir: Path, expert: bool
) -> dict[int, dict[str, Any]]:
    """One OpenRLHF prompt row per case index: chat messages, overview image path, JSON label."""
    from medeyes.trajectories import image_digest
    from medeyes_env.env import MedEyesEnv

    train = config.train
    source = open_case_source(train.data, train.data_options.model_dump())
    env = MedEyesEnv(source, split=split, config=train.env)  # type: ignore[arg-type]
    rows: dict[int, dict[str, Any]] = {}
    for index in indices:
        env.reset(options={"case_index": index})
        case = env.case
        messages = env.chat_messages("pil")
        system = env.system_prompt()
        user = next(m for m in messages if m["role"] == "user")
        overview, question = user["content"][0]["image"], user["content"][1]["text"]
        for text in (system, question):
            if "<image>" in text:
                raise ConfigError(
                    f"case {case.id!r}: its text contains '<image>', which OpenRLHF's dataset reads as an image "
                    "placeholder; edit the case text"
                )
        path = images_dir / f"{image_digest(overview)}.png"
        if not path.exists():
            overview.save(path)
        label = CaseLabel(source=train.data, split=split, index=index, case_id=case.id, expert=expert)  # type: ignore[arg-type]
        rows[index] = {
            "prompt": [
                {"role": "system", "content": system.strip()},
                {"role": "user", "content": "<image>" + question.strip()},
            ],
            "images": [str(path)],
            "label": label.dumps(),
            "datasource": f"medeyes-{split}",
        }
    return rows


def _pool_size(config: OpenRLHFConfig, split: str) -> int:
    train = config.train
    needed = train.grpo.steps * train.grpo.prompts_per_step
    size = open_case_source(train.data, train.data_options.model_dump()).size(split)  # type: ignore[arg-type]
    pool = train.train_cases or (min(needed, train.expert.cases) if config.dual else needed)
    pool = max(1, pool)
    return min(pool, size) if size else pool


def _expert_cases(config: OpenRLHFConfig, pool: int) -> list[ExpertCase]:
    """Expert trajectories of the first ``pool`` training cases (generated with the expert agent when absent)."""
    from medeyes.training.expert_data import brief_record, ensure_expert_trajectories
    from medeyes_env.sources import open_cases

    train = config.train
    source = open_cases(train.data, train.data_options.model_dump())
    store = ensure_expert_trajectories(train, source)
    index_of = {source.case(train.train_split, i).id: i for i in range(pool)}
    by_case: dict[int, list[ExpertTrajectory]] = {}
    for record in store.records():
        if not (record.kept and record.steps and record.case_id in index_of):
            continue
        if train.expert.reasoning == "brief":
            record = brief_record(record, train.env.box_format)
        by_case.setdefault(index_of[record.case_id], []).append(
            ExpertTrajectory(
                trajectory_id=record.trajectory_id, turns=[s.text for s in record.steps], reward=record.reward
            )
        )
    return [
        ExpertCase(
            case_id=source.case(train.train_split, i).id,
            source=train.data,
            split=train.train_split,
            index=i,
            trajectories=trajectories,
        )
        for i, trajectories in sorted(by_case.items())
    ]


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def export_openrlhf_data(config: OpenRLHFConfig, expert_cases: Sequence[ExpertCase] | None = None) -> ExportSummary:
    """Write the prompt, eval and expert files, the backend config and the agent file into ``config.data_dir``.

    Args:
        config: The run.
        expert_cases: The off-policy stream's trajectories; None makes them from ``train.expert`` (the
            trainer's expert store, generated with the GRN + CVS expert when absent). Ignored without a
            ``dual`` grpo mode.

    Raises:
        ConfigError: a dual run without any expert trajectory, or case text that breaks the prompt format.

    """
    train = config.train
    out = config.data_dir
    images = out / IMAGES_DIR
    images.mkdir(parents=True, exist_ok=True)
    pool = _pool_size(config, train.train_split)
    n_rows = train.grpo.steps * train.grpo.prompts_per_step
    if n_rows == 0:
        raise ConfigError("train.grpo.steps is 0: nothing to train on OpenRLHF; set grpo.steps")
    expert_rows: list[ExpertCase] = []
    if config.dual:
        expert_rows = list(expert_cases) if expert_cases is not None else _expert_cases(config, pool)
        if not expert_rows:
            raise ConfigError(
                "no expert trajectory for any training case; check train.expert (oracle, keep_only_correct) or "
                "use grpo.mode=on_policy"
            )
    cases = _case_rows(config, train.train_split, range(pool), images, expert=config.dual)
    prompt_rows = [cases[k % pool] for k in range(n_rows)]
    size = open_case_source(train.data, train.data_options.model_dump()).size(train.eval_split)
    held = train.eval.indices(size) if train.eval.every > 0 else range(0)
    eval_rows = list(_case_rows(config, train.eval_split, held, images, expert=False).values())

    _write_jsonl(out / PROMPTS_FILE, prompt_rows)
    files = [PROMPTS_FILE]
    if eval_rows:
        _write_jsonl(out / EVAL_FILE, eval_rows)
        files.append(EVAL_FILE)
    if config.dual:
        _write_jsonl(out / EXPERT_FILE, [row.model_dump(mode="json") for row in expert_rows])
        files.append(EXPERT_FILE)
    backend = config.backend()
    backend.save(out / BACKEND_FILE)
    (out / AGENT_FILE).write_text(_AGENT_TEMPLATE.format(config=str(out / BACKEND_FILE)))
    files += [BACKEND_FILE, AGENT_FILE, IMAGES_DIR + "/"]
    return ExportSummary(
        directory=out,
        prompt_rows=len(prompt_rows),
        train_cases=pool,
        eval_rows=len(eval_rows),
        expert_cases=len(expert_rows),
        expert_trajectories=sum(len(r.trajectories) for r in expert_rows),
        files=files,
    )


def check_export(config: OpenRLHFConfig) -> list[str]:
    """Problems with ``config.data_dir`` for this config (missing files, a backend config that differs)."""
    out = config.data_dir
    problems = [
        f"{out / name} is missing" for name in (PROMPTS_FILE, BACKEND_FILE, AGENT_FILE) if not (out / name).is_file()
    ]
    if config.dual and not (out / EXPERT_FILE).is_file():
        problems.append(f"{out / EXPERT_FILE} is missing")
    if not problems:
        stored = BackendConfig.load(out / BACKEND_FILE)
        if stored != config.backend():
            problems.append(f"{out / BACKEND_FILE} was exported with other settings; export again")
    return problems
