"""The peak panel: ordered cell types, each with its set of marker peaks.

Written by ``select-peaks`` as JSON, read by ``encode``, ``train`` and ``predict``.
The panel's identity is the hash of its content, stored in the file and re-checked on
every read, so an edited or corrupted panel is refused.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hitanno_cli import artifacts
from hitanno_cli.errors import UserError
from hitanno_cli.genome import Intervals


@dataclass
class PeakSet:
    """One cell type's peaks, best first."""

    cell_type: str
    n_cells: int
    names: list[str]
    chrom: list[str | None]
    start: list[int | None]
    end: list[int | None]
    score: list[float]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.cell_type,
            "n_cells": self.n_cells,
            "peaks": {
                "name": self.names,
                "chrom": self.chrom,
                "start": self.start,
                "end": self.end,
                "score": self.score,
            },
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PeakSet:
        peaks = obj["peaks"]
        return cls(
            obj["name"],
            int(obj["n_cells"]),
            list(peaks["name"]),
            list(peaks["chrom"]),
            list(peaks["start"]),
            list(peaks["end"]),
            [float(s) for s in peaks["score"]],
        )


@dataclass
class Panel:
    """The ordered peak sets plus the identity of the reference they came from."""

    sets: list[PeakSet]
    reference_universe: str
    n_reference_peaks: int
    header: dict[str, Any] = field(default_factory=dict)

    @property
    def cell_types(self) -> list[str]:
        return [s.cell_type for s in self.sets]

    @property
    def n_types(self) -> int:
        return len(self.sets)

    @property
    def peaks_per_type(self) -> int:
        return len(self.sets[0].names) if self.sets else 0

    @property
    def size(self) -> int:
        """Total panel peaks, ``n_types * peaks_per_type``."""
        return self.n_types * self.peaks_per_type

    def flat_names(self) -> np.ndarray:
        """Panel peak names in set order (position ``t * P + j``)."""
        return np.array([n for s in self.sets for n in s.names], dtype=object)

    def flat_intervals(self) -> Intervals:
        """Panel peak coordinates in set order; -1 / None where unknown."""
        chrom = np.array([c for s in self.sets for c in s.chrom], dtype=object)
        start = np.array([-1 if v is None else v for s in self.sets for v in s.start], np.int64)
        end = np.array([-1 if v is None else v for s in self.sets for v in s.end], np.int64)
        return Intervals(chrom, start, end)

    def body(self) -> dict[str, Any]:
        """The content that the panel hash covers."""
        return {
            "reference_peak_universe": self.reference_universe,
            "n_reference_peaks": self.n_reference_peaks,
            "peaks_per_type": self.peaks_per_type,
            "cell_types": [s.to_json() for s in self.sets],
        }

    @functools.cached_property
    def body_text(self) -> str:
        """The canonical JSON text of :meth:`body`: what the content hash covers."""
        return artifacts.canonical_json(self.body())

    @functools.cached_property
    def content_hash(self) -> str:
        return artifacts.sha256_text(self.body_text)

    def to_json(self) -> dict[str, Any]:
        return {"header": self.header, "content_hash": self.content_hash, "panel": self.body()}

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write the panel atomically, its content last and in the very text its hash covers.

        A reader can then check the hash on the file's own bytes instead of serialising
        the parsed content again (:meth:`load`).
        """
        artifacts.atomic_write_text(path, self.text(), overwrite)

    def text(self) -> str:
        """The panel as :meth:`save` writes it (header and hash first, the content last)."""
        head = json.dumps({"header": self.header, "content_hash": self.content_hash}, ensure_ascii=False)
        return head[:-1] + _BODY_KEY + self.body_text + "}\n"

    @classmethod
    def from_json(cls, obj: Any, source: str | Path = "panel") -> Panel:
        """Rebuild and verify a panel from its JSON form."""
        panel = cls._build(obj, source)
        if panel.content_hash != obj.get("content_hash"):
            raise UserError(
                f"{source} is corrupted or was edited: its content does not match its hash",
                "re-create it with hitanno select-peaks",
            )
        return panel

    @classmethod
    def _build(cls, obj: Any, source: str | Path) -> Panel:
        """The panel of a parsed file (``{"header", "content_hash", "panel"}``), hash unchecked."""
        if not isinstance(obj, dict):
            raise UserError(f"{source} is not a hitanno panel", "pass a panel.json from select-peaks")
        header = artifacts.check_header(obj.get("header"), artifacts.PANEL, source)
        try:
            body = obj["panel"]
            return cls(
                [PeakSet.from_json(s) for s in body["cell_types"]],
                body["reference_peak_universe"],
                int(body["n_reference_peaks"]),
                header,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{source} is a damaged panel (missing {err})", "re-create it") from None

    @classmethod
    def load(cls, path: str | Path) -> Panel:
        """Read and verify a panel file.

        A file laid out by :meth:`save` is verified by hashing its content's text as it
        stands; any other layout (hand-formatted, older versions) by the canonical form
        of what was parsed.
        """
        return cls.parse(artifacts.read_text(path, "panel"), path)

    @classmethod
    def parse(cls, text: str, source: str | Path) -> Panel:
        """A panel from the text of its file (see :meth:`load`), verified."""
        path = source
        parts = _saved_parts(text)
        if parts is not None:
            head_text, body_text = parts
            head = _try_json(head_text)
            if isinstance(head, dict) and head.get("content_hash") == artifacts.sha256_text(body_text):
                panel = cls._build({**head, "panel": artifacts.parse_json(body_text, path, "panel")}, path)
                panel.__dict__.update(body_text=body_text, content_hash=head["content_hash"])
                return panel
        return cls.from_json(artifacts.parse_json(text, path, "panel"), path)


#: What precedes the content in a file written by :meth:`Panel.save`.
_BODY_KEY = ',"panel":'


def _saved_parts(text: str) -> tuple[str, str] | None:
    """``(header and hash, content)`` texts of a file laid out by :meth:`Panel.save`, else None."""
    cut, end = text.rfind(_BODY_KEY), len(text.rstrip()) - 1
    if cut < 0 or end <= cut or text[end] != "}":
        return None
    return text[:cut] + "}", text[cut + len(_BODY_KEY) : end]


def _try_json(text: str) -> Any:
    """Parsed ``text``, or None if it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
