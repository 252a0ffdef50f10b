"""``medeyes cases``: look at what a data source yields, as a table and optionally as a picture."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medeyes.cli.common import console, friendly_errors, safe
from medeyes_env.cases import SPLITS
from medeyes_env.errors import ConfigError
from medeyes_env.sources import iter_cases, open_source


@friendly_errors
def cases(
    data: Annotated[
        str, typer.Option(help="Data source spec: phantom, phantom:hard, samples, jsonl:/path, ...")
    ] = "phantom",
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "test",
    n: Annotated[int, typer.Option(min=1, help="How many cases to list.")] = 8,
    gallery: Annotated[
        Path | None, typer.Option(help="Also save a PNG grid of the cases with gold boxes here.")
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            help="Check the whole dataset instead: counts per split and answer type, unreadable images, answer "
            "balance and the blind majority-answer accuracy per split."
        ),
    ] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="--check: the first N cases of each split only.")] = None,
) -> None:
    """List cases of a data source: question, answer, gold regions (or --check the whole dataset)."""
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    source = open_source(data)
    if check:
        from medeyes.cli.audit import print_audit

        print_audit(data, source, limit)
        return
    selected = list(iter_cases(source, split, n))  # type: ignore[arg-type]
    table = Table(title=safe(f"{data} / {split}: {len(selected)} case(s)"))
    for column in ("id", "modality", "question", "answer", "type", "gold regions"):
        table.add_column(column, overflow="fold")
    for case in selected:
        regions = ", ".join(f"{r.label} [{', '.join(str(round(v)) for v in r.box)}]" for r in case.regions) or "-"
        table.add_row(
            *(safe(v) for v in (case.id, case.modality, case.question, case.answer, case.answer_type.value)),
            safe(regions),
        )
    console.print(table)
    if gallery is not None:
        from medeyes_env.gallery import case_gallery

        case_gallery(selected).save(gallery)
        console.print(f"saved {safe(gallery)}")
