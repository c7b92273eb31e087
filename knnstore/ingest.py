"""Sources -> documents -> windows -> keys -> pair batches, streaming.

The pipeline is a chain of generators, so memory is bounded by one group of documents
and one batch of windows, whatever the corpus size. Its heart, :func:`encode_documents`,
maps a batch of tokenised documents to Arrow record batches of pairs, the shape an
engine such as Ray Data could run unchanged.

Accepted sources (one PATH each; several may be given):

* a directory: every ``*.txt`` / ``*.md`` file below it, one document per file, in path
  order; files that are binary, not UTF-8 or empty are skipped and reported;
* a directory written by ``datasets.Dataset.save_to_disk``: one document per row;
* ``.txt`` / ``.md``: one document, or one per WikiText-style `` = Title = `` article with
  ``split_on_heading``;
* ``.jsonl``: one document per line, text in ``text_field``, other fields kept as metadata;
* ``.parquet``: one document per row, same rule.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from .config import IngestSettings, SourceOptions
from .errors import InputError, ModelRunError
from .schema import pairs_batch
from .windows import right_padded, windows

if TYPE_CHECKING:  # torch only in annotations: importing ingest (the CLI's sources) needs no torch
    import torch

TEXT_SUFFIXES = {".txt", ".md"}
_HEADING = re.compile(r"^ = ([^=].*) = $")  # WikiText top-level heading: " = Title = "
_SNIFF = 8192


@dataclass
class SourceDocument:
    ordinal: int  # position in the source; resume matches documents by it
    source: str  # path, path:line, or external id
    title: str | None
    text: str
    meta: dict | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass
class SourceScan:
    """What a validation pass over the sources found (nothing is written)."""

    n_documents: int = 0
    n_tokens: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def skipped_summary(self) -> str:
        return f"skipped {len(self.skipped)} file(s): {describe_skipped(self.skipped)}"


def describe_skipped(skipped, limit: int = 5) -> str:
    """'path (reason), ... and N more' for a list of (path, reason) pairs."""
    shown = ", ".join(f"{p} ({why})" for p, why in skipped[:limit])
    return shown + (f" and {len(skipped) - limit} more" if len(skipped) > limit else "")


class NotText(Exception):
    pass


def check_source_path(path: Path, shown: str | os.PathLike | None = None) -> None:
    """Refuse, before anything is read, a source that is missing or is neither a directory
    nor a regular file: a FIFO would block the writer forever, /dev/zero never ends."""
    shown = path if shown is None else shown
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"no such file or directory: {shown}") from None
    except OSError as exc:
        raise InputError(f"cannot read {shown} ({exc.strerror or exc}): check the path and its permissions") from None
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise InputError(f"{shown} is not a regular file or a directory (a device, pipe or socket): "
                         "give a file or a directory of files")


def read_text_file(path: Path) -> str:
    """A regular file's text; raises NotText("binary" / "not UTF-8 ...") otherwise, and
    InputError for what is not a regular file (opened without blocking, checked, then read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise InputError(f"cannot read {path} ({exc.strerror or exc}): check the path and its permissions") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{path} is not a regular file (a device, pipe or socket): give a text file")
        try:
            data = fh.read()
        except OSError as exc:  # e.g. /proc/self/mem: a "regular" file that cannot be read
            raise InputError(f"cannot read {path} ({exc.strerror or exc}): give a readable text file") from None
    if b"\x00" in data[:_SNIFF]:
        raise NotText("binary")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotText(f"not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}") from None


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _split_articles(text: str) -> Iterator[tuple[int, str | None, str]]:
    """(first line number, title, text) of each `` = Title = `` article."""
    start, title, lines = 1, None, []
    for lineno, line in enumerate(text.splitlines(keepends=True), start=1):
        match = _HEADING.match(line.rstrip("\r\n"))
        if match:  # a new article starts; blank lines before it belong to nobody
            if any(l.strip() for l in lines):
                yield start, title, "".join(lines)
            start, title, lines = lineno, match.group(1).strip(), []
        lines.append(line)
    if any(l.strip() for l in lines):
        yield start, title, "".join(lines)


def _meta(record: dict, text_field: str) -> dict | None:
    meta = {k: v for k, v in record.items() if k != text_field}
    if not meta:
        return None
    return json.loads(json.dumps(meta, default=str))  # JSON-safe (dates, numpy scalars)


def _records_to_documents(records: Iterable[tuple[str, dict]], text_field: str,
                          where: str) -> Iterator[tuple[str, str | None, str, dict | None]]:
    for source, record in records:
        if text_field not in record:
            raise InputError(
                f"{source}: no '{text_field}' field (fields: {', '.join(map(str, record)) or 'none'}); "
                "name the text field with --text-field"
            )
        text = record[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise InputError(f"{source}: field '{text_field}' is {type(text).__name__}, not text")
        title = record.get("title") if isinstance(record.get("title"), str) else None
        external = record.get("id")
        yield (f"{where}#{external}" if external is not None else source), title, text, _meta(record, text_field)


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}:{lineno}: not UTF-8; fix or remove that line") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: malformed JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            try:  # "\ud800" parses, but a lone surrogate is not text: nothing can store it
                json.dumps(record, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"{path}:{lineno}: holds a lone surrogate escape (such as \\ud800), "
                                 "which is not text; fix or remove that line") from None
            yield f"{path}:{lineno}", record


def _parquet_records(path: Path, text_field: str) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise InputError(f"{path}: not a readable parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise InputError(
            f"{path}: no column '{text_field}' (columns: {', '.join(names)}); "
            "name the text column with --text-field"
        )
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield f"{path}#{row}", record
            row += 1


def _hf_records(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"{path} is a Hugging Face dataset; reading it needs the datasets package: "
            "pip install 'knnstore[hf]'"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise InputError(
            f"{path} holds the splits {', '.join(ds)}; pass one of them, e.g. {path / next(iter(ds))}"
        )
    for row, record in enumerate(ds):
        yield f"{path}#{row}", record


def iter_documents(paths: Iterable[str | Path], options: SourceOptions,
                   skipped: list[tuple[str, str]] | None = None) -> Iterator[SourceDocument]:
    """Every document of the sources, in a deterministic order.

    Files inside a directory that are binary, not UTF-8 or empty are skipped and appended
    to ``skipped`` as (path, reason); a file named directly that is not text is an error.
    """
    skipped = [] if skipped is None else skipped
    ordinal = 0

    def emit(source, title, text, meta=None):
        nonlocal ordinal
        doc = SourceDocument(ordinal, source, title, text, meta)
        ordinal += 1
        return doc

    for raw in paths:
        path = Path(raw)
        check_source_path(path)
        if path.is_dir() and _is_hf_dataset_dir(path):
            items = _records_to_documents(_hf_records(path), options.text_field, str(path))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise InputError(f"{path}: no .txt or .md files in this directory")
            items = _dir_documents(files, skipped)
        elif path.suffix.lower() == ".jsonl":
            items = _records_to_documents(_jsonl_records(path), options.text_field, str(path))
        elif path.suffix.lower() == ".parquet":
            items = _records_to_documents(_parquet_records(path, options.text_field), options.text_field, str(path))
        else:
            try:
                text = read_text_file(path)
            except NotText as exc:
                raise InputError(
                    f"{path}: {exc}; knnstore reads UTF-8 text (.txt, .md, .jsonl, .parquet); "
                    "convert or remove it"
                ) from None
            if options.split_on_heading:
                items = ((f"{path}:{line}", title, body, None) for line, title, body in _split_articles(text))
            else:
                items = iter([(str(path), path.stem, text, None)])
        for source, title, text, meta in items:
            if not text.strip():
                continue
            yield emit(source, title, text, meta)


def _dir_documents(files: list[Path], skipped: list[tuple[str, str]]):
    for f in files:
        try:
            text = read_text_file(f)
        except NotText as exc:
            skipped.append((str(f), str(exc)))
            continue
        if not text.strip():
            skipped.append((str(f), "empty"))
            continue
        yield str(f), f.stem, text, None


def limited(docs: Iterator[SourceDocument], max_documents: int | None) -> Iterator[SourceDocument]:
    for i, doc in enumerate(docs):
        if max_documents is not None and i >= max_documents:
            return
        yield doc


def scan(paths: list[str], options: SourceOptions, tokenize: Callable[[str], list[int]]) -> SourceScan:
    """Validation pass: read and tokenise every document, write nothing.

    Raises InputError for missing paths, unreadable or malformed files and for a corpus
    with no document of at least 2 tokens (one pair needs a context and a next token).
    """
    result = SourceScan()
    for doc in limited(iter_documents(paths, options, result.skipped), options.max_documents):
        n = len(tokenize(doc.text))
        if n >= 2:
            result.n_documents += 1
            result.n_tokens += n
    if result.n_documents == 0:
        extra = f" ({result.skipped_summary()})" if result.skipped else ""
        raise InputError(
            f"the corpus is empty: no document of at least 2 tokens in {', '.join(map(str, paths))}{extra}"
        )
    return result


# --- windows and encoding ---------------------------------------------------------


def encode_documents(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    documents: list[tuple[int, list[int]]],
    corpus_id: int,
    settings: IngestSettings,
    schema: pa.Schema,
    codec=None,
) -> Iterator[tuple[pa.RecordBatch, int]]:
    """Map tokenised documents to record batches of pairs (``codec``: the projection that
    quantises a quantised store's keys, ``schema.key_columns``).

    Args:
        forward: (input_ids [B, T], attention_mask [B, T]) -> keys [B, T, dim].
        documents: (document id, token ids) each; documents never share a window.
    Yields:
        (record batch of pairs, number of new positions it covers).
    """
    # Every window of every document: (doc index, begin, end, keep_from). Only positions
    # 0..n-2 have a next token, so windows run over the first n-1 tokens.
    spans = [
        (d, b, e, k)
        for d, (_, tokens) in enumerate(documents)
        for b, e, k in windows(len(tokens) - 1, settings.window, settings.stride)
    ]
    spans.sort(key=lambda s: s[2] - s[1], reverse=True)  # similar lengths share a batch
    np_dtype = key_dtype(schema)
    for i in range(0, len(spans), settings.batch_size):
        batch = spans[i : i + settings.batch_size]
        ids, mask = right_padded([documents[d][1][b:e] for d, b, e, _ in batch])
        keys = forward(ids, mask)  # [B, width, dim]
        cols: dict[str, list] = {n: [] for n in ("doc", "pos", "tok", "next", "vec")}
        for row, (d, b, e, k) in enumerate(batch):
            tokens = documents[d][1]
            pos = np.arange(k, e)
            cols["doc"].append(np.full(len(pos), documents[d][0], dtype=np.int64))
            cols["pos"].append(pos)
            cols["tok"].append(np.asarray(tokens[k:e], dtype=np.int32))
            cols["next"].append(np.asarray(tokens[k + 1 : e + 1], dtype=np.int32))
            cols["vec"].append(keys[row, k - b : e - b].numpy().astype(np_dtype))
        doc, pos = np.concatenate(cols["doc"]), np.concatenate(cols["pos"])
        batch_rb = pairs_batch(schema, document_id=doc, position=pos, corpus_id=corpus_id,
                               token=np.concatenate(cols["tok"]), next_token=np.concatenate(cols["next"]),
                               vector=np.concatenate(cols["vec"]), codec=codec)
        yield batch_rb, len(pos)


def with_keys(batch: pa.RecordBatch, keys: np.ndarray, schema: pa.Schema, codec=None) -> pa.RecordBatch:
    """``batch`` with its key columns replaced by ``keys`` [rows, key dim] (a batch encoded
    before the store's projection was fitted, projected into ``schema``; ``codec`` as in
    ``encode_documents``)."""
    col = {name: batch.column(name).to_numpy() for name in ("document_id", "position", "token", "next_token")}
    corpus_id = int(batch.column("corpus_id")[0].as_py()) if batch.num_rows else 0
    return pairs_batch(schema, corpus_id=corpus_id, vector=np.asarray(keys).astype(key_dtype(schema)), codec=codec,
                       **col)


def key_dtype(schema: pa.Schema) -> type:
    """The numpy type of the table's keys (float16 or float32)."""
    return np.float16 if schema.field("vector").type.value_type == pa.float16() else np.float32


def model_forward(encoder, corpus: str, store_path, projection=None,
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``forward`` for ``encode_documents``: the encoder's keys for a batch (projected by
    the store's ``projection`` where it reduces its keys), with the model's own failures
    (torch's errors inside it: bad weights, a device out of memory) as one ModelRunError
    that says how to go on (in one process and in a Ray worker alike)."""
    def forward(ids, mask):
        try:
            keys = encoder.forward(ids, mask)[0]
            return keys if projection is None else projection.apply(keys)
        except (RuntimeError, ValueError, IndexError) as exc:
            detail = (str(exc).strip().splitlines() or ["-"])[0]
            raise ModelRunError(
                f"the model {encoder.name} failed while encoding corpus {corpus!r} ({type(exc).__name__}: "
                f"{detail}); the corpus is kept as failed: fix the model, then "
                f"`knnstore resume-corpus {store_path} {corpus}`"
            ) from exc
    return forward
