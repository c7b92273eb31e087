"""Store: opens a store directory and ties the catalog, the pairs table and the model.

Example:
    >>> store = Store.create("wiki-store", model="smollm2-135m")          # doctest: +SKIP
    >>> store.add_corpus("wiki", ["valid.txt"],
    ...                  options=SourceOptions(split_on_heading=True))    # doctest: +SKIP
    >>> store.stats().pairs                                               # doctest: +SKIP
    241530
    >>> store.search(keys, k=16).next_tokens.shape                        # doctest: +SKIP
    (8, 16)

Consistency: a corpus is visible to readers (search, stats' pair counts, SQL) only once
the catalog marks it ready, which happens after its last pair is committed to LanceDB.
Pairs of corpora being ingested, failed or being removed stay in the table but are
filtered out. A store handle reads a consistent snapshot; ``refresh()`` moves it on.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Sequence

import numpy as np

from . import catalog
from .catalog import READY
from .config import (
    CATALOG_FILE,
    DEFAULT_MODEL,
    DTYPES,
    IngestSettings,
    ProgressFn,
    SourceOptions,
    check_number,
)
from .devices import resolve_compute_dtype, resolve_device
from .distributed import ray_options
from .errors import InputError, StoreChangedError
from .handle import StoreHandle
from .indexing import IndexPlan, IndexWatch
from .layout import StoreParts, check_new_store, create_store, open_parts, resolve_catalog_url
from .projection import KeyProjection
from .results import CorpusInfo, StoreStats
from .vectors import ExactSearch, Neighbours
from .writer import Writer

if TYPE_CHECKING:
    from .encoder import Encoder


class Store(StoreHandle):
    """A knnstore store: a directory with a SQL catalog and a LanceDB `pairs` table. The
    facade users get: a ``StoreHandle`` (its parts and reader snapshot) with the
    operations as methods, each delegated to the module that owns it."""

    def __init__(self, parts: StoreParts, encoder: Encoder | None = None, *,
                 device: str = "auto", compute_dtype: str = "auto") -> None:
        self._writer = Writer(self)
        self._exact_search: ExactSearch | None = None
        super().__init__(parts, encoder, device=device, compute_dtype=compute_dtype)

    @property
    def _exact(self) -> ExactSearch:
        """The exact search over this store's table (its key cache made on first use)."""
        if self._exact_search is None or self._exact_search.table is not self.table:
            self._exact_search = ExactSearch(self.table, device=self.device)
        return self._exact_search

    # --- creating and opening -----------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, model: str = DEFAULT_MODEL, *, key_layer: int = -1,
               key_site: str = "ffn_input", dtype: str = "float16",
               catalog_url: str | None = None, encoder: Encoder | None = None,
               device: str = "auto", compute_dtype: str = "auto",
               storage_options: dict[str, str] | None = None, key_dim: int | None = None,
               key_bits: int | None = None, route_dim: int | None = None) -> "Store":
        """Create a store for ``model`` (alias, Hugging Face id or local path) at ``path``:
        a local directory, or ``s3://bucket/prefix`` (``gs://``, ``az://``) with a
        ``catalog_url`` outside it (PostgreSQL to share it between machines).

        ``key_dim``: store keys reduced to this many dimensions by a PCA projection fitted
        on the first corpus's keys (``knnstore.projection``); None keeps the model's keys.
        ``key_bits`` (4 or 8, with ``key_dim``): keep those keys as per-dimension codes beside
        a ``route_dim``-dimensional float routing key the index is built on (default 64).

        The model is loaded once (on ``device`` in ``compute_dtype``, see ``open``) to read
        its identity and vocabulary; pass ``encoder`` to reuse one already loaded. Nothing
        is left behind if creation fails. ``storage_options``: see ``open``.
        """
        catalog_url = resolve_catalog_url(catalog_url)
        place = check_new_store(path, catalog_url, storage_options)  # cheap checks first: before the model loads
        if dtype not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        resolve_compute_dtype(resolve_device(device), compute_dtype)  # before anything loads or is written
        if key_dim is not None:
            check_number("key_dim", key_dim, 1, None, integer=True)
            route_dim = KeyProjection.check_quantisation(key_dim, key_bits, route_dim)
        elif key_bits is not None or route_dim is not None:
            raise InputError("--key-bits and --route-dim quantise reduced keys: give --key-dim too")
        if encoder is None:
            from .encoder import Encoder

            encoder = Encoder.load(model, key_layer=key_layer, key_site=key_site, device=device,
                                   compute_dtype=compute_dtype)
        identity = encoder.identity(dtype)
        if key_dim is not None:
            check_number(f"key_dim (the model's keys have {identity.dim} dimensions)", key_dim, 1, identity.dim,
                         integer=True)
            identity = dataclasses.replace(identity, key_dim=key_dim, key_bits=key_bits, route_dim=route_dim)
        create_store(place, identity, catalog.vocab_rows(encoder.tokenizer), catalog_url)
        # through the URL given: the marker keeps it without its password
        return cls.open(place, encoder=encoder, device=device, compute_dtype=compute_dtype, catalog_url=catalog_url)

    @classmethod
    def open(cls, path: str | os.PathLike, *, model: str | None = None,
             encoder: Encoder | None = None, device: str = "auto", compute_dtype: str = "auto",
             storage_options: dict[str, str] | None = None, catalog_url: str | None = None) -> "Store":
        """Open a store; upgrades an older catalog. The model is loaded only when needed.

        Refuses, before reading anything else, a catalog that belongs to another store
        (``StoreMismatchError``: a ``KNNSTORE_CATALOG_URL`` left set for another store).

        Args:
            model: check now that this model is the store's (refused if it differs).
            encoder: an already loaded model to use (checked the same way).
            device: where the model is loaded and the exact search runs: ``auto`` (a GPU
                when there is one), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
            compute_dtype: the model's float type there: ``auto`` (float32 on the CPU,
                bfloat16 or float16 on a GPU), ``float32``, ``float16``, ``bfloat16``.
                Keys are stored in the store's dtype whatever this is.
            storage_options: for a store on an object store, Lance's options (e.g.
                ``aws_endpoint``, ``aws_region``, ``allow_http``); by default the standard
                environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).
                Never recorded with the store.
            catalog_url: the catalog's URL, over ``KNNSTORE_CATALOG_URL`` and the one the
                store records (which never holds a password).
        """
        if (device, compute_dtype) != ("auto", "auto"):  # a bad choice fails before anything is opened
            device = resolve_device(device)
            resolve_compute_dtype(device, compute_dtype)
        parts = open_parts(path, storage_options, catalog_url)
        store = cls(parts, device=device, compute_dtype=compute_dtype)
        if encoder is None and model is not None:
            encoder = store.load_encoder(model)
        if encoder is not None:
            store.use_encoder(encoder)
        return store

    # --- reading ---------------------------------------------------------------------

    def snippet(self, document_id: int, position: int, before: int = 24, after: int = 8) -> str:
        """Source text around one stored pair, decoded from the stored tokens.

        The pair's token (position) and next token are marked with ``[[...]]``.
        """
        left, here, nxt, right = self.table.tokens_around(document_id, position, before, after)
        if here is None:
            return ""
        decode = self.encoder.tokenizer.decode
        return f"{decode(left)}{decode([here])}[[{decode([nxt])}]]{decode(right)}"

    def stats(self) -> StoreStats:
        rows = self.catalog_rows
        ready = [c for c in rows if c.status == READY]
        pairs = sum(c.n_pairs for c in ready)
        nbytes = self.table.nbytes()
        if self.own_catalog:
            nbytes += sum(p.stat().st_size for p in self.location.path.glob(CATALOG_FILE + "*"))
        ident = self.identity
        return StoreStats(
            path=str(self.path), model=ident.model, key_layer=ident.key_layer,
            key_site=ident.key_site, dim=ident.dim, dtype=ident.dtype, metric=ident.metric,
            format_version=ident.format_version, catalog=catalog.mask(self.catalog_url),
            corpora=len(rows), documents=sum(c.n_documents for c in ready), pairs=pairs,
            table_rows=self.table.count(), bytes_on_disk=nbytes,
            bytes_per_pair=round(nbytes / pairs, 1) if pairs else None,
            index=self.table.index_state(), key_dim=ident.key_dim, key_bits=ident.key_bits,
            route_dim=ident.route_dim,
            key_projection=self.projection.describe() if self.projection is not None else None,
            tokens=sum(c.n_tokens for c in ready), weighted=self.table.weighted,
        )

    def search(self, vectors: np.ndarray, k: int = 16, *, exact: bool = False,
               nprobes: int = 32, refine_factor: int | None = None, verify_nearest: bool = False) -> Neighbours:
        """The k nearest stored pairs (squared L2) of each row of ``vectors`` [Q, dim].

        One batched search for all rows; only pairs of ready corpora are returned.
        With an ANN index (and ``exact=False``) LanceDB answers from ``nprobes``
        partitions, re-ranking ``refine_factor`` x k candidates with exact distances
        (None: as the index type needs, see ``index_kinds.AUTO_REFINE``); otherwise a
        brute-force scan (torch) gives the exact neighbours. ``verify_nearest``: rows whose
        estimated nearest stands out get exact distances (``vectors.VERIFY_NEAREST``).
        """
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if vectors.ndim != 2 or vectors.shape[1] != self.identity.dim:
            raise InputError(
                f"query vectors have dim {vectors.shape[-1]}; this store's keys have dim {self.identity.dim}"
            )

        def search() -> Neighbours:
            queries = self.stored_keys(vectors)
            if exact or not self.table.has_vector_index():
                return self._exact.search(queries, k, corpora=self.visible_corpora)
            return self.table.search(queries, k, corpora=self.visible_corpora, nprobes=nprobes,
                                     refine_factor=refine_factor, verify_nearest=verify_nearest)

        try:
            with self.following():
                return search()
        except StoreChangedError:  # a compaction, prune or purge removed what it read: follow the store
            self.refresh()
            return search()

    def stored_keys(self, keys: np.ndarray) -> np.ndarray:
        """Model keys [N, dim] as the table holds them: projected where the store reduces
        its keys (the one place queries and stored keys are made alike)."""
        if self.identity.key_dim is None:
            return keys
        if self.projection is None:
            raise InputError(f"{self.path} reduces its keys to {self.identity.key_dim} dimensions but has no "
                             "projection yet: it is fitted on the first corpus's keys; add a corpus first")
        return self.projection.apply(keys)

    def compact(self, key_dim: int, progress: ProgressFn | None = None, *, key_bits: int | None = None,
                route_dim: int | None = None):
        """Rewrite the store's keys reduced to ``key_dim`` dimensions by a PCA of its own
        keys, quantised to ``key_bits`` per dimension beside a ``route_dim``-dimensional
        routing key if given (``knnstore.compaction``); returns a ``Compaction``. Readers
        holding the store open must reopen it afterwards."""
        from .compaction import compact

        return compact(self, key_dim, progress, key_bits=key_bits, route_dim=route_dim)

    def check(self, repair: bool = False):
        """``knnstore check``: whether catalog and table agree (``check.CheckReport``);
        with ``repair``, fix what is safe (see ``knnstore.check``)."""
        from .check import check

        return check(self, repair=repair)

    def sql(self, query: str):
        """Run one read-only SQL query over the store's views; returns a pyarrow Table.

        Views: pairs, documents, corpora, vocab, runs (see ``knnstore.sql``). Anything
        but SELECT is refused with ReadOnlyError, and the store is never changed.
        """
        with self.sql_session() as session, self.following():
            return session.execute(query)

    def create_index(self, num_partitions: int | None = None, num_sub_vectors: int | None = None,
                     index_type: str | None = None) -> None:
        """Train the ANN index on the stored keys; searches use it from then on.

        ``index_type``: ``ivf_rq`` (the default: IVF with 4-bit RaBitQ codes, ranked
        without re-reading keys) or ``ivf_pq`` (IVF-PQ, re-ranked with exact distances);
        see ``PairsTable.create_index``.
        """
        self._writer.create_index(num_partitions=num_partitions, num_sub_vectors=num_sub_vectors,
                                  index_type=index_type)

    def update_index(self) -> int:
        """Index the rows added since the index was trained (a delta index, no retraining);
        returns how many rows it indexed."""
        return self._writer.update_index()

    def index_plan(self) -> IndexPlan:
        """What the index policy would do now (``indexing.plan``; ``maintain_index`` does it)."""
        return self._writer.index_plan()

    def maintain_index(self, watch: IndexWatch | None = None) -> IndexPlan:
        """Apply the index policy (``index_plan``); returns the plan it carried out. A build
        runs inside ``watch(plan)`` (``indexing.IndexWatch``: say what is being done)."""
        return self._writer.maintain_index(watch)

    def index(self, *, rebuild: bool = False, index_type: str | None = None, num_partitions: int | None = None,
              num_sub_vectors: int | None = None, watch: IndexWatch | None = None) -> IndexPlan:
        """``knnstore index``: train an index now (``rebuild``, or any of its parameters
        given: ``num_sub_vectors`` implies IVF-PQ), else apply the policy; returns what the
        policy says afterwards (see ``maintain_index`` for ``watch``)."""
        return self._writer.index(rebuild=rebuild, index_type=index_type, num_partitions=num_partitions,
                                  num_sub_vectors=num_sub_vectors, watch=watch)

    # --- writing ---------------------------------------------------------------------

    def save_calibration(self, cal, text_source: str, n_tokens: int) -> int:
        """Store a fitted calibration; adaptive λ at its k and T uses it from now on."""
        return self._writer.save_calibration(cal, text_source, n_tokens)

    def clear_calibrations(self) -> int:
        """Delete every calibration (``--adaptive`` falls back to the rule); returns how many."""
        return self._writer.clear_calibrations()

    # --- writing: the protocol lives in writer.py ----------------------------------------

    def add_corpus(self, name: str, paths: Sequence[str | os.PathLike], *,
                   options: SourceOptions = SourceOptions(),
                   settings: IngestSettings | None = None,
                   progress: ProgressFn | None = None, index: bool = True,
                   workers: int | None = None, ray_address: str | None = None) -> CorpusInfo:
        """Encode every document of ``paths`` and store its pairs as corpus ``name``.

        All sources are read and validated before anything is written: bad input raises
        InputError and leaves the store as it was. If ingestion dies part way, the corpus
        stays invisible to readers, is reported failed, and ``resume_corpus(name)`` or
        ``remove_corpus(name)`` finishes the job. Then, with ``index``, the index policy
        runs (``maintain_index``): the new rows are indexed incrementally, and the index is
        trained or retrained only past its thresholds. Searches see the new rows at once.

        With ``workers`` (or ``ray_address``), the documents are encoded by that many Ray
        workers (on a local Ray runtime, or the cluster at ``ray_address``) and committed in
        one commit at the end (``knnstore.distributed``): the same pairs as without.
        """
        return self._writer.add_corpus(name, paths, options=options, settings=settings,
                                       progress=progress, index=index, ray=ray_options(workers, ray_address))

    def resume_corpus(self, name: str, progress: ProgressFn | None = None, index: bool = True,
                      workers: int | None = None, ray_address: str | None = None) -> CorpusInfo:
        """Finish an interrupted or failed add: keeps the documents already committed
        (``workers`` / ``ray_address``: on Ray, as ``add_corpus``)."""
        return self._writer.resume_corpus(name, progress=progress, index=index,
                                          ray=ray_options(workers, ray_address))

    def remove_corpus(self, name: str) -> None:
        """Delete a corpus's pairs and catalog rows. The index is not rebuilt."""
        self._writer.remove_corpus(name)

    def remove_documents(self, where: str, corpus: str | None = None, *, dry_run: bool = False,
                         refuse_above: int | None = None):
        """Remove the documents matching ``where``, an SQL condition over the ``documents``
        view (e.g. ``"path LIKE '%/2019/%'"``, ``"document_id IN (3, 7)"``), and their pairs,
        without a rebuild; ``corpus`` limits it to one corpus; ``dry_run`` only says what
        would go. Returns a ``DocumentRemoval``. A condition that matches nothing, or is not
        a read-only SQL condition, raises and changes nothing (see ``knnstore.removal``);
        with ``refuse_above``, so does one that matches every document or more than that many."""
        from .removal import remove_documents

        return remove_documents(self, where, corpus, dry_run=dry_run, refuse_above=refuse_above)

    def forget(self, text: str, *, ignore_case: bool = False, context: int = 0, documents: bool = False,
               dry_run: bool = False):
        """Remove every pair whose next token overlaps an occurrence of ``text`` in a
        stored document, matched on the documents' decoded text (``ignore_case``: any
        case); ``context`` N: also the pairs with an occurrence token among their last N
        context tokens; ``documents``: the whole documents that contain it instead.
        ``dry_run`` only says what would go. Returns a ``Forgetting``; the catalog keeps a
        salted hash of the text, never the text. The rows leave the disk with ``purge``."""
        from .removal import forget

        return forget(self, text, ignore_case=ignore_case, context=context, documents=documents, dry_run=dry_run)

    def prune(self, corpus: str | None = None, *, neighbours: int | None = None, exact: bool = False,
              dry_run: bool = False, progress: ProgressFn | None = None):
        """Merge neighbouring pairs that share a next token into one weighted pair (greedy
        merging, ``knnstore.pruning``), in every ready corpus or in ``corpus``;
        ``neighbours`` nearest looked at per pair (default 16). Returns a ``Pruning``."""
        from .pruning import DEFAULT_NEIGHBOURS, prune

        return prune(self, corpus, neighbours=DEFAULT_NEIGHBOURS if neighbours is None else neighbours, exact=exact,
                     dry_run=dry_run, progress=progress)

    def purge(self) -> dict[str, int]:
        """Take removed rows off the disk (``knnstore purge``): rewrite the data files that
        hold deleted rows, drop old table versions, vacuum the catalog. A reader that holds
        a snapshot from before may fail to read it afterwards and must ``refresh``."""
        from .removal import purge

        return purge(self)

    def check_new_corpus(self, name: str, paths: Sequence[str | os.PathLike]) -> tuple[str, list[str]]:
        """Cheap checks of an add, before any model is loaded: name free, paths present.

        Returns the normalised name and the absolute paths.
        """
        return self._writer.check_new_corpus(name, paths)

