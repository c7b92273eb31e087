"""Distributed ingest on Ray Data: encoder actors write Lance data fragments, the driver
commits them all in one Lance commit (``add-corpus --workers N`` / ``--ray-address``).

The driver (the ``Writer`` holding the store's lock) reads and validates the sources,
writes the catalog rows (documents ``pending``), cuts the documents into shards and hands
them to a pool of encoder actors (``ray.data`` ``map_batches`` with a callable class: one
model per actor, a GPU each where there are GPUs). Each actor encodes its shards exactly as
the single-process path does (``ingest.encode_documents``: same windows, same pair ids) and
writes their pairs as new data files of the store's table (``lance.fragment.
write_fragments``), committing nothing. The driver then commits every fragment of the
corpus in one ``LanceOperation.Append`` and marks documents and corpus ready: a corpus is
all or nothing, as with one process. Files of a worker that died, or of a run that
failed, are referenced by no version of the table: ``check --repair`` (Lance's cleanup)
deletes them, and ``resume-corpus`` encodes the documents again.

Ray is an optional extra: ``pip install 'knnstore[ray]'``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from .config import IngestSettings, StoreIdentity, check_number
from .errors import InputError, ModelMismatchError
from .faults import crash_point
from .ingest import encode_documents, model_forward
from .location import Location

MAX_WORKERS = 1024
SHARDS_PER_WORKER = 4  # shards per worker: a slow shard or a restarted worker delays less


@dataclass(frozen=True)
class RayOptions:
    """Where encoding runs: ``workers`` encoder actors on a local Ray runtime started for
    the run, or on the cluster at ``address`` (also read from ``RAY_ADDRESS``)."""

    workers: int = 1
    address: str | None = None

    def __post_init__(self) -> None:
        check_number("workers", self.workers, 1, MAX_WORKERS, integer=True)


def ray_options(workers: int | None, address: str | None) -> RayOptions | None:
    """RayOptions for ``workers`` / ``address`` (None for neither: one process)."""
    if workers is None and address is None:
        return None
    if address is not None and not address.strip():
        raise InputError("the Ray address is empty: give ADDRESS (e.g. ray://head:10001), or leave "
                         "--ray-address out to start a local Ray runtime")
    return RayOptions(workers=1 if workers is None else workers, address=address)


def ray_module():
    """``ray`` (with Ray Data), or a one-line InputError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError("--workers and --ray-address need Ray: pip install 'knnstore[ray]'") from None
    return ray


RAY_CONNECT_S = 5.0  # how long the cluster's address may take to answer before add-corpus gives up


def check_ray(options: RayOptions) -> None:
    """Before anything is read or written (and before the write lock): Ray is installed
    (``ray_module``), and the cluster's address (``--ray-address`` or ``RAY_ADDRESS``)
    answers a TCP connection within ``RAY_CONNECT_S``; an unreachable one is a one-line
    InputError, never a hang holding the lock. ``auto`` and ``local`` are left to Ray."""
    import socket
    from urllib.parse import urlparse

    ray_module()
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    try:
        host, port = parsed.hostname, parsed.port or 10001
    except ValueError as exc:
        raise InputError(f"the Ray address {address!r} is not host:port ({exc}): check --ray-address") from None
    if not host:
        raise InputError(f"the Ray address {address!r} names no host: give e.g. ray://head:10001")
    try:
        with socket.create_connection((host, port), timeout=RAY_CONNECT_S):
            pass
    except OSError as exc:
        raise InputError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}): check --ray-address "
                         "or RAY_ADDRESS; nothing was written") from None


@contextmanager
def ray_runtime(options: RayOptions) -> Iterator[None]:
    """A Ray runtime for one run: the cluster at ``options.address`` (or ``RAY_ADDRESS``),
    else a local one started here (every CPU, shared by the workers) and shut down afterwards."""
    ray = ray_module()
    if ray.is_initialized():
        yield
        return
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    try:
        # "local": a runtime of its own, never one that another run left behind
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
    except ConnectionError as exc:
        raise InputError(f"cannot reach the Ray cluster at {address} ({exc}): check --ray-address "
                         "or RAY_ADDRESS") from None
    try:
        yield
    finally:
        ray.shutdown()


def shards(documents: Sequence[tuple[int, Sequence[int]]], n: int) -> list[bytes]:
    """``documents`` (id, tokens) cut into at most ``n`` shards of about equal tokens (whole
    documents each, longest first), for Ray's object store: each a pickled list of (id,
    int32 array), 4 bytes a token (``read_shard``)."""
    bins: list[list[tuple[int, Sequence[int]]]] = [[] for _ in range(max(1, min(n, len(documents))))]
    loads = [0] * len(bins)
    for doc in sorted(documents, key=lambda d: -len(d[1])):
        i = loads.index(min(loads))
        bins[i].append(doc)
        loads[i] += len(doc[1])
    return [pickle.dumps([(int(d), np.asarray(t, dtype=np.int32)) for d, t in b], protocol=5) for b in bins if b]


def read_shard(shard: bytes) -> list[tuple[int, np.ndarray]]:
    """A shard's documents (``shards``); pickled by this knnstore's own driver."""
    return pickle.loads(shard)


class EncoderWorker:
    """One Ray actor: the store's model, loaded once, encoding shards into fragments."""

    def __init__(self, identity: dict, uri: str, schema: bytes, settings: dict, corpus_id: int,
                 corpus: str, store_path: str, device: str, compute_dtype: str, threads: int,
                 weights=None, storage_options: dict | None = None, projection: bytes | None = None) -> None:
        import torch

        torch.set_num_threads(threads)
        ident = StoreIdentity(**identity)
        self.encoder = _worker_encoder(ident, weights, device, compute_dtype)
        if self.encoder.model_fingerprint() != ident.model_fingerprint:
            raise ModelMismatchError(f"a Ray worker loaded {ident.model} with other weights than the "
                                     "store's: give every worker the same model files")
        self.uri, self.corpus_id, self.storage_options = uri, corpus_id, storage_options
        from .projection import KeyProjection

        self.projection = None if projection is None else KeyProjection.from_bytes(projection)
        self.forward = model_forward(self.encoder, corpus, store_path, self.projection)
        self.schema = pa.ipc.read_schema(pa.py_buffer(schema))
        self.settings = IngestSettings(**settings)

    def __call__(self, batch: dict) -> dict:
        from lance.fragment import write_fragments

        out: dict[str, list] = {"fragments": [], "pairs": [], "documents": []}
        for shard in batch["shard"]:
            docs = read_shard(shard)
            batches = (b for b, _ in encode_documents(self.forward, docs, self.corpus_id, self.settings, self.schema,
                                                             self.projection))
            frags = write_fragments(pa.RecordBatchReader.from_batches(self.schema, batches), self.uri,
                                    schema=self.schema, mode="append", storage_options=self.storage_options)
            crash_point("ray.worker_after_fragments")
            out["fragments"].append(json.dumps([f.to_json() for f in frags]))
            out["pairs"].append(sum(f.num_rows for f in frags))
            out["documents"].append(len(docs))
        return out


def _worker_encoder(ident: StoreIdentity, weights, device: str, compute_dtype: str):
    """The store's model in a worker: from the driver's weights when it shipped them
    (``model_weights``: a model built from its config, the float32 weights loaded, 1.5 s for
    SmolLM2), else loaded by name (15.6 s for SmolLM2's GGUF)."""
    import torch

    from .encoder import Encoder

    if weights is None:
        return Encoder.load(ident.model, ident.key_layer, ident.key_site, device=device,
                            compute_dtype=compute_dtype)
    if not isinstance(weights, dict):  # an object reference Ray left unresolved
        weights = ray_module().get(weights)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(weights["config"])
    model.load_state_dict({k: torch.from_numpy(np.require(v, requirements="W")) for k, v in weights["state"].items()})
    model.eval()
    return Encoder(model, None, ident.model, ident.key_layer, ident.key_site).to(device, compute_dtype)


def model_weights(encoder) -> dict | None:
    """The driver's model as {config, float32 state as numpy}, to ship to workers through
    Ray's object store; None where it is not a float32 model on the CPU (workers then load
    it by name)."""
    import torch

    if encoder is None or encoder.device.type != "cpu" or encoder.compute_dtype != torch.float32:
        return None
    return {"config": encoder.model.config,
            "state": {k: v.detach().numpy() for k, v in encoder.model.state_dict().items()}}


def encode_on_ray(documents: Sequence[tuple[int, Sequence[int]]], *, identity: StoreIdentity, table_uri: Location,
                  schema: pa.Schema, settings: IngestSettings, corpus_id: int, corpus: str, store_path: str,
                  options: RayOptions, device: str, compute_dtype: str, encoder=None, projection=None,
                  progress: Callable[[int, int], None] | None = None) -> tuple[list, int]:
    """Encode ``documents`` (id, tokens) on Ray and write their pairs as uncommitted
    fragments of the table at ``table_uri``; returns (fragments, pairs). ``corpus`` and
    ``store_path`` name them in a model failure's message. ``encoder``: the
    driver's loaded model, whose weights the workers then take instead of loading it again;
    ``projection``: the store's key projection (``knnstore.projection``), if it reduces keys.
    ``progress(documents, pairs)`` is called as shards finish."""
    ray = ray_module()
    from lance.fragment import FragmentMetadata

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # knnstore shows its own progress
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    with ray_runtime(options):
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = gpus > 0 and device != "cpu"
        cpus = ray.cluster_resources().get("CPU", 1)
        threads = max(1, int(cpus // options.workers))
        items = [{"shard": s} for s in shards(documents, options.workers * SHARDS_PER_WORKER)]
        weights = model_weights(encoder)
        weights_ref = None if weights is None else ray.put(weights)
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            EncoderWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=options.workers),
            num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else threads,
            fn_constructor_kwargs={
                "identity": dataclasses.asdict(identity),
                "uri": table_uri.uri, "storage_options": table_uri.lance_options(), "schema": schema.serialize().to_pybytes(),
                "settings": dataclasses.asdict(settings), "corpus_id": corpus_id, "corpus": corpus,
                "store_path": store_path,
                "device": "auto" if use_gpu else "cpu", "compute_dtype": compute_dtype, "threads": threads,
                "weights": weights_ref, "projection": None if projection is None else projection.to_bytes()})
        # Ray Data restarts an actor whose process dies and retries its shard (its defaults);
        # an exception raised in Python fails the run (the corpus is kept failed).
        fragments, pairs = [], 0
        for row in dataset.iter_rows():
            fragments += [FragmentMetadata.from_json(json.dumps(f)) for f in json.loads(row["fragments"])]
            pairs += int(row["pairs"])
            if progress is not None:
                progress(int(row["documents"]), int(row["pairs"]))
    return fragments, pairs
