"""The expert on the phantom test split: every oracle x every ablation mode, in one table.

    python benchmarks/expert_table.py                     # 200 test cases per cell, 2 trajectories per case
    python benchmarks/expert_table.py --n 50 --samples 6  # the paper's N_expert
    python benchmarks/expert_table.py --vlm-url http://127.0.0.1:8000/v1   # adds the VLM oracle's rows

Columns: accuracy (mean accuracy reward), mean best IoU of the explored boxes against the gold boxes
(cases with gold regions), r_div (the diversity reward), distinct paths (share of distinct action
sequences among a case's trajectories), mean tool steps, and trajectories per second on one core
(environment + expert, no storage; images rendered once up front and shared by the cells; the image
oracle caches its scan per image, so its first cell pays for every scan and later cells reuse them). The
``random agent`` row is a format-perfect guesser that sees no oracle (chance level). A last line
measures throughput with the trajectory store writing every observation image.

Prints a rich table and writes ``docs/expert_table.md``.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medeyes.agents.expert.agent import make_expert
from medeyes.agents.expert.config import EXPERT_MODES
from medeyes.agents.random_agent import RandomAgent
from medeyes.rollout import RolloutConfig, run_rollout
from medeyes.rollout_summary import RolloutSummary, summarize
from medeyes.trajectories import TrajectoryStore
from medeyes_env.sources import open_source

ROOT = Path(__file__).resolve().parents[1]


class CachedSource:
    """Wraps a source; renders each image once and keeps it (grey images as 8-bit L, 1 MB at 1024 px)."""

    def __init__(self, spec: str) -> None:
        self.inner = open_source(spec)
        self.name = self.inner.name
        self._cases: dict = {}
        self._images: dict = {}

    def size(self, split):
        return self.inner.size(split)

    def case(self, split, index):
        key = (split, index)
        if key not in self._cases:
            self._cases[key] = self.inner.case(split, index)
        case = self._cases[key]

        def image(key=key, case=case):
            if key not in self._images:
                rgb = case.load_image()
                r, g, b = rgb.split()
                self._images[key] = r if r.tobytes() == g.tobytes() == b.tobytes() else rgb
            stored = self._images[key]
            return stored.convert("RGB") if stored.mode != "RGB" else stored.copy()

        return case.model_copy().with_image_factory(image)


def cell(agent, source, n: int, samples: int, seed: int) -> RolloutSummary:
    config = RolloutConfig(split="test", n=n, samples_per_case=samples, seed=seed, batch_size=16)
    result = run_rollout(agent, source, config)
    return summarize(result.records, result.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="phantom", help="data source spec (default: phantom, medium preset)")
    parser.add_argument("--n", type=int, default=200, help="test cases per cell")
    parser.add_argument("--samples", type=int, default=2, help="trajectories per case (greedy always draws 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--oracles", default="annotation,image", help="comma-separated oracles")
    parser.add_argument("--modes", default=",".join(EXPERT_MODES), help="comma-separated expert modes")
    parser.add_argument("--vlm-url", default=None, help="also run the VLM oracle against this /v1 endpoint")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "expert_table.md")
    args = parser.parse_args()

    console = Console()
    source = CachedSource(args.data)
    oracles = [o for o in args.oracles.split(",") if o]
    if args.vlm_url:
        oracles.append("vlm")
    modes = [m for m in args.modes.split(",") if m]
    started = time.perf_counter()
    # Render every image once up front, so no cell's throughput pays for drawing the phantom.
    for index in range(args.n):
        source.case("test", index).load_image()
    render_seconds = time.perf_counter() - started
    rows: list[tuple[str, str, RolloutSummary]] = []
    for oracle in oracles:
        for mode in modes:
            options = {"base_url": args.vlm_url} if oracle == "vlm" else {}
            agent = make_expert(oracle, mode, seed=args.seed)
            if options:
                from medeyes.agents.expert.oracles.factory import make_oracle

                agent.oracle = make_oracle("vlm", **options)
            summary = cell(agent, source, args.n, 1 if mode == "greedy" else args.samples, args.seed)
            rows.append((oracle, mode, summary))
            console.print(
                f"{oracle:>10} {mode:>10}: acc {summary.accuracy:.3f} IoU {summary.mean_best_iou:.3f} "
                f"steps {summary.mean_steps:.2f} ({summary.trajectories_per_second:.1f}/s)"
            )
    rows.append(("-", "random agent", cell(RandomAgent(), source, args.n, args.samples, args.seed)))

    # Throughput with storage: the same full expert writing every record and observation image.
    with tempfile.TemporaryDirectory() as tmp:
        store = TrajectoryStore(Path(tmp) / "run")
        agent = make_expert(oracles[0], "full", seed=args.seed)
        config = RolloutConfig(split="test", n=min(args.n, 50), samples_per_case=6, seed=args.seed)
        stored = run_rollout(agent, source, config, store=store)
        stored_rate = len(stored.records) / stored.seconds

    headers = ["oracle", "mode", "accuracy", "mean best IoU", "r_div", "distinct paths", "mean steps", "traj/s"]
    table = Table(title=f"Expert on {args.data} test: {args.n} cases per cell, {args.samples} trajectories per case")
    for header in headers:
        table.add_column(header, justify="left" if header in ("oracle", "mode") else "right")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for oracle, mode, s in rows:
        values = [
            oracle,
            mode,
            f"{s.accuracy:.3f}",
            f"{s.mean_best_iou:.3f}",
            f"{s.mean_components.get('diversity', 0.0):.3f}",
            "-" if s.path_diversity is None else f"{s.path_diversity:.2f}",
            f"{s.mean_steps:.2f}",
            f"{s.trajectories_per_second:.1f}",
        ]
        table.add_row(*values)
        lines.append("| " + " | ".join(values) + " |")
    console.print(table)
    families = sorted({f for _, _, s in rows for f in s.accuracy_by_family})
    family_lines = ["| oracle | mode | " + " | ".join(families) + " |", "|" + "---|" * (len(families) + 2)]
    for oracle, mode, s in rows:
        cells = [f"{s.accuracy_by_family[f]:.2f}" if f in s.accuracy_by_family else "-" for f in families]
        family_lines.append(f"| {oracle} | {mode} | " + " | ".join(cells) + " |")
    elapsed = time.perf_counter() - started
    console.print(f"with the trajectory store writing records and images: {stored_rate:.1f} trajectories/s")
    console.print(f"total {elapsed:.0f} s")
    command = "python benchmarks/expert_table.py" + (
        "" if (args.n, args.samples) == (200, 2) else f" --n {args.n} --samples {args.samples}"
    )
    text = "\n".join(
        [
            "# Expert trajectories on the phantom: oracles x ablations",
            "",
            f"Produced by `{command}` ({elapsed:.0f} s on {platform.processor() or platform.machine()}, one process,"
            " on a machine shared with other jobs; throughput numbers are indicative). Rendering the "
            f"{args.n} phantom images first took {render_seconds:.0f} s and is not in any cell's throughput.",
            "",
            f"Data: `{args.data}`, test split, cases 0..{args.n - 1}; {args.samples} trajectories per case "
            "(greedy: 1); seed " + str(args.seed) + ". Columns as in the script's docstring.",
            "",
            *lines,
            "",
            "Accuracy by question family:",
            "",
            *family_lines,
            "",
            f"Throughput with the trajectory store writing every record and observation image "
            f"({oracles[0]} oracle, full mode, 6 trajectories per case): {stored_rate:.1f} trajectories/s.",
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
