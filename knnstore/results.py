"""What a store's reads return: a corpus as ``knnstore list`` shows it, the store's
statistics, and a document reference for provenance (plain data, no behaviour)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime

from .index_kinds import IndexState


@dataclass
class CorpusInfo:
    id: int
    name: str
    status: str  # ready | ingesting | failed | removing
    source: str
    documents: int
    tokens: int
    pairs: int
    bytes: int  # the corpus's rows at their stored size (index and garbage excluded)
    created_at: datetime
    ready_at: datetime | None
    error: str | None = None  # why it failed, for a failed corpus
    skipped: list = dataclasses.field(default_factory=list)  # [path, reason] of files left out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("created_at", "ready_at"):
            d[key] = d[key].isoformat() if d[key] else None
        return d


@dataclass
class StoreStats:
    path: str
    model: str
    key_layer: int
    key_site: str
    dim: int
    dtype: str
    metric: str
    format_version: int
    catalog: str
    corpora: int
    documents: int
    pairs: int  # pairs visible to readers (ready corpora)
    table_rows: int  # rows in the LanceDB table, hidden ones included
    bytes_on_disk: int
    bytes_per_pair: float | None
    index: IndexState
    key_dim: int | None = None  # reduced keys: the stored dimension (None: the model's dim)
    key_projection: str | None = None  # its projection, described (``projection``)
    key_bits: int | None = None  # quantised keys: bits per dimension of their codes
    route_dim: int | None = None  # quantised keys: the routing key's dimension
    tokens: int = 0  # tokens of the ready corpora's documents (pairs + one a document, unless pruned)
    weighted: bool = False  # whether some corpus was pruned (rows carry weights)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "index": self.index.to_dict()}


@dataclass(frozen=True)
class DocumentRef:
    """Where a stored pair came from, as the catalog names it."""

    id: int
    corpus: str
    source: str
    title: str | None


@dataclass
class DocumentRemoval:
    """What ``remove-documents`` took out (or, with ``dry_run``, would take out): every
    matching document (id, corpus, source, title, pairs) and the totals."""

    condition: str
    documents: list[dict]
    pairs: int
    dry_run: bool

    def to_dict(self) -> dict:
        return {"condition": self.condition, "dry_run": self.dry_run, "n_documents": len(self.documents),
                "n_pairs": self.pairs, "documents": self.documents}


@dataclass
class Forgetting:
    """What ``forget`` took out (or, with ``dry_run``, would): how often the text occurs,
    in how many documents, and the pairs removed (whole documents with ``documents``)."""

    occurrences: int
    documents: int
    pairs_removed: int
    dry_run: bool
    whole_documents: bool
    by_document: list[dict]  # document_id, corpus, source, occurrences, pairs
    in_catalog: int = 0  # catalog fields (titles, paths, metadata, corpus sources) it was redacted from
    pruned_corpora: list[str] = dataclasses.field(default_factory=list)  # may carry it unseen (``prune``)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
