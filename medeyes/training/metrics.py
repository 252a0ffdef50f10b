"""Training metrics: one JSONL line per logged step, TensorBoard scalars, and the health statistics.

Namespaces (METHOD.md section 7): ``train/`` (loss, lr, grad norm, throughput, stage), ``eval/`` (held-out
accuracy, IoU, steps), ``stream/on/`` and ``stream/off/`` (per-stream health: reward components,
advantages, tool use, turns, parse rate, response length, ratio and clip statistics). ``metrics.jsonl``
is appended and flushed line by line. Row ``step = k`` describes the run after ``k`` optimizer updates (row 0:
the evaluation before training). On resume from a checkpoint taken after ``k`` updates, rows with
``step > k`` (written after that checkpoint by the crashed run) are dropped first, so no step appears twice.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Append-only JSONL metrics (``<run_dir>/metrics.jsonl``) with optional TensorBoard mirror."""

    def __init__(self, run_dir: str | os.PathLike[str], tensorboard: bool = True, resume_step: int | None = None):
        """Open the run's metrics; with ``resume_step``, drop lines of steps > it (a crashed run's tail)."""
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = resume_step + 1 if resume_step is not None else None
                self._writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge)
            except ImportError:  # tensorboard not installed: JSONL only
                self._writer = None

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Write one line ``{"step": step, ...}`` (non-finite floats become null) and mirror numbers to TB."""
        row: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            row[key] = _clean(value)
        line = json.dumps(row, sort_keys=False) + "\n"
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        if self._writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()
        return row

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _clean(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_after(path: Path, step: int) -> None:
    """Rewrite ``path`` keeping only complete lines whose ``step`` is at most ``step``."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn last line
        if isinstance(row, dict) and int(row.get("step", -1)) <= step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every row of ``<run_dir>/metrics.jsonl`` (a torn last line is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _std(values: Sequence[float]) -> float | None:
    if not values:
        return None
    mu = sum(values) / len(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / len(values))


def tool_use_accuracy(records: Iterable[Any], prefix: str) -> dict[str, float]:
    """Share of episodes that used a tool, and the mean accuracy of those that did and of those that did not.

    Keys ``{prefix}tool_share``, ``{prefix}accuracy_with_tool``, ``{prefix}accuracy_without_tool``; an accuracy
    whose set of episodes is empty is left out (never NaN), and no records give no keys. Accuracy is the
    ``accuracy`` reward component, as in the rollout summary.

    >>> from types import SimpleNamespace as R
    >>> looked, guessed = R(tool_steps=2, reward_components={"accuracy": 1.0}), R(tool_steps=0, reward_components={})
    >>> tool_use_accuracy([looked, guessed, guessed], "eval/")
    {'eval/tool_share': 0.3333333333333333, 'eval/accuracy_with_tool': 1.0, 'eval/accuracy_without_tool': 0.0}
    >>> tool_use_accuracy([guessed], "stream/on/")
    {'stream/on/tool_share': 0.0, 'stream/on/accuracy_without_tool': 0.0}
    """
    records = list(records)
    if not records:
        return {}
    split: dict[bool, list[float]] = {True: [], False: []}
    for r in records:
        split[r.tool_steps > 0].append(float(r.reward_components.get("accuracy", 0.0)))
    out = {f"{prefix}tool_share": len(split[True]) / len(records)}
    for used, name in ((True, "with_tool"), (False, "without_tool")):
        if split[used]:
            out[f"{prefix}accuracy_{name}"] = sum(split[used]) / len(split[used])
    return out


def episode_health(records: Iterable[Any], prefix: str) -> dict[str, float]:
    """Health statistics of a set of trajectory records under ``prefix`` (``stream/on/``, ``eval/`` ...).

    Reward and each component (mean), accuracy, share of episodes that used scan / drill / any tool, accuracy
    with and without tool use (:func:`tool_use_accuracy`), turns per episode, share of turns that parsed and
    that were well formed, share of episodes that answered, response length in tokens (when token ids are
    known) and characters.
    """
    records = list(records)
    if not records:
        return {}
    out: dict[str, float] = {f"{prefix}episodes": float(len(records))}
    rewards = [float(r.reward) for r in records]
    out[f"{prefix}reward_mean"] = _mean(rewards) or 0.0
    out[f"{prefix}reward_std"] = _std(rewards) or 0.0
    components: dict[str, list[float]] = {}
    for r in records:
        for key, value in r.reward_components.items():
            components.setdefault(key, []).append(float(value))
    for key, values in components.items():
        out[f"{prefix}reward/{key}"] = sum(values) / len(values)
    steps = [s for r in records for s in r.steps]
    names = [[s.action.name for s in r.steps if s.action is not None and s.shown_boxes] for r in records]
    out[f"{prefix}scan_share"] = sum("scan" in n for n in names) / len(records)
    out[f"{prefix}drill_share"] = sum("drill" in n for n in names) / len(records)
    out.update(tool_use_accuracy(records, prefix))
    out[f"{prefix}tool_calls"] = sum(len(n) for n in names) / len(records)
    out[f"{prefix}turns"] = len(steps) / len(records)
    out[f"{prefix}answered"] = sum(bool(r.terminated) for r in records) / len(records)
    if steps:
        out[f"{prefix}parse_rate"] = sum(s.action is not None for s in steps) / len(steps)
        out[f"{prefix}well_formed"] = sum(bool(s.well_formed) for s in steps) / len(steps)
        out[f"{prefix}response_chars"] = sum(len(s.text) for s in steps) / len(steps)
        lengths = [len(s.token_ids) for s in steps if s.token_ids is not None]
        if lengths:
            out[f"{prefix}response_tokens"] = sum(lengths) / len(lengths)
            finished = [s.finish_reason for s in steps if s.finish_reason is not None]
            if finished:
                out[f"{prefix}length_capped"] = sum(f == "length" for f in finished) / len(finished)
    return out


def tool_collapse_alarm(step: int, metrics: dict[str, float], floor: float | None, shown: bool) -> bool:
    """Set ``alarm/tool_collapse`` when the on-policy tool share is below ``floor``; warn unless ``shown``.

    Returns whether the warning has been shown now. Without a floor or a ``stream/on/tool_share`` nothing is set.
    """
    share = metrics.get("stream/on/tool_share")
    if floor is None or share is None:
        return shown
    metrics["alarm/tool_collapse"] = float(share < floor)
    if share < floor and not shown:
        warnings.warn(
            f"step {step + 1}: on-policy tool share {share:.2f} is below grpo.tool_floor={floor:g}; the policy is "
            "dropping its tools (tool collapse). See 'Keeping tools alive' in docs/training.md.",
            RuntimeWarning,
            stacklevel=2,
        )
        return True
    return shown


def weighted_mean_metrics(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Micro-batch metrics ``(rows, metrics)`` merged: min of ``*_min``, max of ``*_max``, summed counts, else means.

    >>> sorted(weighted_mean_metrics([(1, {"a": 0.0, "x/rows": 1.0}), (3, {"a": 1.0, "x/rows": 3.0})]).items())
    [('a', 0.75), ('x/rows', 4.0)]
    """
    total = sum(w for w, _ in parts) or 1
    keys = {k for _, m in parts for k in m}
    out = {}
    for key in keys:
        if key.endswith(("_min",)):
            out[key] = min(m[key] for _, m in parts if key in m)
        elif key.endswith(("_max",)):
            out[key] = max(m[key] for _, m in parts if key in m)
        elif key.endswith(("/rows", "/tokens")):
            out[key] = sum(m[key] for _, m in parts if key in m)
        else:
            weight = sum(w for w, m in parts if key in m) or total
            out[key] = sum(w * m[key] for w, m in parts if key in m) / weight
    return out


def progress_stats(live: dict[str, float], blind: float | None, tool_floor: float | None) -> str:
    """The live part of the progress line (rich markup): loss, reward, tool share, held-out and blind accuracy.

    >>> progress_stats({"train/loss": 0.5, "stream/on/tool_share": 0.0, "alarm/tool_collapse": 1.0}, 0.4, 0.1)
    'loss 0.500  tools 0.00 [bold red]< floor 0.1: tool collapse[/]  (blind 0.400)'
    """
    parts = []
    if "train/loss" in live:
        parts.append(f"loss {live['train/loss']:.3f}")
    if "stream/on/reward_mean" in live:
        parts.append(f"reward {live['stream/on/reward_mean']:.2f}")
    if "stream/on/tool_share" in live:
        alarm = live.get("alarm/tool_collapse") and tool_floor is not None
        warning = f" [bold red]< floor {tool_floor:g}: tool collapse[/]" if alarm else ""
        parts.append(f"tools {live['stream/on/tool_share']:.2f}{warning}")
    if "eval/accuracy" in live:
        parts.append(f"held-out acc {live['eval/accuracy']:.3f}")
    if blind is not None:
        parts.append(f"(blind {blind:.3f})")
    return "  ".join(parts)


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, start: int, stats: Callable[[], str]) -> Iterator[Callable[[str], None]]:
    """A rich progress bar over ``total`` steps from ``start``; yields ``advance(stage)``, which also shows ``stats()``.

    Disabled: yields an ``advance`` that does nothing.
    """
    if not enabled:
        yield lambda stage: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.fields[stage]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}"),
    ) as progress:
        task = progress.add_task("train", total=total, completed=start, stage="train", stats="")

        def advance(stage: str) -> None:
            progress.update(task, advance=1, stage=stage, stats=stats())

        yield advance
