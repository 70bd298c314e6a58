"""Cell sentences: every cell's open/closed state at each panel peak.

:mod:`.matching` finds the panel's peaks in a data set (by name, then by overlap),
:mod:`.packing` holds sentences in memory (bit-packed, or as open positions),
:mod:`.store` is the on-disk format and its verifying reader, and :mod:`.encoding` is the
stage that writes a store from an ``.h5ad`` (sharded across processes if asked).
"""

from hitanno_cli.sentences.encoding import BackgroundWriter, encode, parse_shard
from hitanno_cli.sentences.matching import PeakMatch, match_panel
from hitanno_cli.sentences.packing import OpenRows, pack_states, unpack_open
from hitanno_cli.sentences.store import SentenceStore, chunk_cells_for, chunk_digest, write_store

__all__ = [
    "BackgroundWriter",
    "OpenRows",
    "PeakMatch",
    "SentenceStore",
    "chunk_cells_for",
    "chunk_digest",
    "encode",
    "match_panel",
    "pack_states",
    "parse_shard",
    "unpack_open",
    "write_store",
]
