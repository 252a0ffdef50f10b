"""Data sources: every dataset becomes :class:`~medeyes_env.cases.Case` objects here, once.

A source is opened from a spec string, ``NAME`` or ``NAME:ARGUMENT``:

- ``phantom`` (the embedded default; ``phantom:easy``/``phantom:hard`` pick a difficulty)
- ``samples`` (real images that ship inside PyPI packages)
- ``jsonl:/path/cases.jsonl``, ``slake:/path``, ``vqa_rad:/path``, ... (local files)
- ``vqa_rad_hf:/path``, ``slake_hf:/path``, ``path_vqa_hf:/path``, ``mmmu:/path`` (parquet), ``omnimedvqa:/path``
- ``nih_cxr:/path``, ``vindr_cxr:/path`` (chest X-rays with gold boxes from annotation files)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

from medeyes_env.cases import Case, Split
from medeyes_env.errors import ConfigError, SourceError


@runtime_checkable
class CaseSource(Protocol):
    """What every source offers: indexed, deterministic access to cases per split."""

    name: str

    def size(self, split: Split) -> int | None:
        """Number of cases in ``split``; ``None`` for an infinite (procedural) source."""
        ...

    def case(self, split: Split, index: int) -> Case:
        """The ``index``-th case of ``split``; the same index always gives the same case."""
        ...


SourceFactory = Callable[[str | None], CaseSource]
OptionsFactory = Callable[[str | None, dict[str, Any]], CaseSource]
_REGISTRY: dict[str, SourceFactory] = {}
_WITH_OPTIONS: dict[str, OptionsFactory] = {}


def register_source(name: str, factory: SourceFactory, with_options: OptionsFactory | None = None) -> None:
    """Make ``open_source(f"{name}:ARG")`` call ``factory(ARG or None)``.

    ``with_options(ARG or None, options)`` is what :func:`open_cases` calls when a config gives ``data_options``.
    """
    _REGISTRY[name] = factory
    if with_options is not None:
        _WITH_OPTIONS[name] = with_options


def _ensure_builtin_sources() -> None:
    # Imported lazily so that importing medeyes_env stays cheap and optional deps stay optional.
    import importlib

    for module in ("phantom.source", "samples", "files", "medvqa", "parquet", "omnimed", "cxr"):
        try:
            importlib.import_module(f"medeyes_env.sources.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"medeyes_env.sources.{module}":
                raise


def available_sources() -> list[str]:
    """Names accepted by :func:`open_source`."""
    _ensure_builtin_sources()
    return sorted(_REGISTRY)


def open_source(spec: str) -> CaseSource:
    """Open a source from ``NAME`` or ``NAME:ARGUMENT``; unknown names get a suggestion."""
    _ensure_builtin_sources()
    name, _, argument = spec.partition(":")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SourceError(f"unknown data source {name!r} in {spec!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](argument or None)


def open_cases(spec: str, options: dict[str, Any] | None = None) -> CaseSource:
    """Open a source as a training config names it: ``options`` (phantom only) override the preset's fields.

    The trainer, ``medeyes rollout --train-config`` and the OpenRLHF backend all open their data here, so a
    config's ``data`` and ``data_options`` give the same cases everywhere, without importing torch.
    """
    if not options:
        return open_source(spec)
    _ensure_builtin_sources()
    name, _, argument = spec.partition(":")
    factory = _WITH_OPTIONS.get(name)
    if factory is None:
        takers = " and ".join(sorted(_WITH_OPTIONS)) or "no"
        raise ConfigError(f"data_options apply to the {takers} source only, not {spec!r}; remove them")
    return factory(argument or None, options)


def iter_cases(source: CaseSource, split: Split, n: int | None = None, start: int = 0) -> Iterator[Case]:
    """Yield ``n`` cases of ``split`` from ``start`` (all of a finite split when ``n`` is None)."""
    size = source.size(split)
    if n is None:
        if size is None:
            raise SourceError(f"source {source.name!r} is infinite; pass n to say how many cases to take")
        n = size - start
    stop = start + n if size is None else min(start + n, size)
    for index in range(start, stop):
        yield source.case(split, index)
