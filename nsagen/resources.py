"""Locate the data nsagen ships (templates, specs, tuned tables, generated modules).

In a source checkout or editable install they are the top-level folders of the repository; in a
built wheel they are installed inside the package as ``nsagen/_data/<folder>``.
"""
from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent
_FOLDERS = ("templates", "specs", "autotune", "generated")


def data_dir(folder: str) -> Path:
    """The directory of one shipped data folder, from the source tree or from the wheel."""
    if folder not in _FOLDERS:
        raise ValueError(f"unknown data folder {folder!r}; one of {_FOLDERS}")
    for candidate in (_PKG / "_data" / folder, _PKG.parent / folder):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"nsagen data folder {folder!r} not found next to {_PKG}")


def prebuilt_module(source: str) -> Path | None:
    """The shipped module (generated/) whose text is exactly `source`, if there is one: the op
    imports it from there and writes nothing, so shipped specs need no writable cache."""
    for p in sorted(data_dir("generated").glob("*.py")):
        if p.stat().st_size == len(source.encode()) and p.read_text() == source:
            return p
    return None


def shipped_specs(family: str | None = None) -> dict[str, Path]:
    """Shipped spec files by name (file stem); with `family` ('nsa' or 'dsa'), only that
    family's (a shipped spec's name starts with its family: nsa-paper, dsa-v32)."""
    return {p.stem: p for p in sorted(data_dir("specs").glob("*.yaml"))
            if family is None or p.stem.startswith(family + "-")}


def shipped_spec_path(name: str) -> Path | None:
    """The path of a shipped spec given its name ('nsa-paper' or 'nsa-paper.yaml'), else None."""
    stem = name[:-5] if name.endswith(".yaml") else name
    return shipped_specs().get(stem)
