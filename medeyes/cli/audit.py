"""``medeyes cases --check``: the dataset audit as a table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from medeyes.cli.common import console, safe
from medeyes.cli.eval import TABLE_WIDTH
from medeyes.evaluation.audit import audit_source
from medeyes_env.sources import CaseSource


def print_audit(spec: str, source: CaseSource, limit: int | None) -> None:
    """Print counts, bad images, answer balance and the blind floor of every split of ``source``."""
    audits = audit_source(source, limit)
    table = Table(title=safe(f"{spec}: dataset check"), header_style="bold")
    columns = ("split", "n", "by answer type", "with regions", "shapes/boxes", "bad images", "yes share")
    for name in (*columns, "top answers", "blind acc"):
        table.add_column(name, justify="right" if name in ("n", "with regions", "bad images", "blind acc") else "left")
    for audit in audits:
        table.add_row(
            audit.split,
            str(audit.n),
            ", ".join(f"{k} {v}" for k, v in sorted(audit.by_type.items())),
            str(audit.with_regions),
            f"{audit.shape_regions}/{audit.box_regions}",
            f"{audit.bad_images}/{audit.images_checked}",
            f"{audit.yes_share:.2f}" if audit.yes_share is not None else "-",
            safe(", ".join(f"{a} ({n})" for a, n in audit.top_answers[:3])),
            f"{audit.blind_accuracy:.3f}" if audit.blind_accuracy is not None else "-",
        )
    Console(emoji=False, width=max(console.width, TABLE_WIDTH)).print(table)
    for audit in audits:
        for problem in audit.problems:
            console.print(f"[red]bad image[/] {safe(problem)}")
    skipped = getattr(source, "n_skipped", 0)
    excluded = getattr(source, "excluded", {})
    if skipped or excluded:
        console.print(safe(f"rows skipped as malformed: {skipped}; left out on purpose: {excluded or 'none'}"))
    console.print("blind acc: the majority answer per question text (from train), the floor to read results against")
    console.print("shapes/boxes: gold regions with an outline (scored by area IoU) and those that are boxes only")
