"""The `knnstore` command: each command parses its arguments, calls one library method
and prints. User mistakes (KnnstoreError) become a one-line message and exit code 1;
progress and status go to stderr so that --json output stays clean.

Everything a user or a corpus supplies (names, paths, text, error messages) is printed
literally: the consoles parse no markup, and control characters are shown escaped
(``_safe``), so neither ``[/]`` nor an ANSI escape in a name can reach the terminal as
anything but text. Numeric options go through ``Num``, which checks them with the
library's own ``config.check_number`` before anything loads.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import time
from contextlib import contextmanager

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .config import (
    DEFAULT_MODEL,
    DTYPES,
    KEY_SITES,
    MAX_BATCH_SIZE,
    MAX_BEAMS,
    MAX_K,
    MAX_NEW_TOKENS,
    MAX_PARTITIONS,
    MAX_SEED,
    MAX_WINDOW,
    SCORE_STRIDE,
    SCORE_WINDOW,
    SQL_MAX_ROWS,
    SQL_MEMORY,
    SQL_TIMEOUT_S,
    IngestSettings,
    KNNSettings,
    SourceOptions,
    check_number,
    describe_range,
    settings_of,
    show_number,
    value_type,
)
from .errors import InputError, KnnstoreError
from .index_kinds import INDEX_TYPES

_PLAIN = {"markup": False, "highlight": False, "emoji": False}
err = Console(stderr=True, soft_wrap=True, **_PLAIN)
# Piped output (scripts, CI logs) gets tables at their natural width, never squeezed.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200, **_PLAIN)

# C0 and C1 control characters but newline and tab, shown as \xNN.
_CONTROL = {i: f"\\x{i:02x}" for i in (*range(32), *range(127, 160)) if chr(i) not in "\n\t"}


def _safe(text) -> str:
    """User- or corpus-supplied text as it may reach a terminal: control characters escaped."""
    return str(text).translate(_CONTROL)


class Num(click.ParamType):
    """A number checked by ``config.check_number`` (finite; in range), the library's check."""

    name = "number"

    def __init__(self, lo=None, hi=None, *, integer: bool = True, lo_open: bool = False) -> None:
        self.lo, self.hi, self.integer, self.lo_open = lo, hi, integer, lo_open
        self.name = "integer" if integer else "number"

    def get_metavar(self, param, ctx=None) -> str:
        """INTEGER, with its range as --help shows it: 'INTEGER 1..4096', 'NUMBER >0'."""
        kind = "INTEGER" if self.integer else "NUMBER"
        fmt = lambda x: None if x is None else (str(x) if self.integer else show_number(x))  # noqa: E731
        lo, hi = fmt(self.lo), fmt(self.hi)
        if lo is not None and hi is not None:
            return f"{kind} ({lo}..{hi}]" if self.lo_open else f"{kind} {lo}..{hi}"
        if lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='}{lo}"
        return kind if hi is None else f"{kind} <={hi}"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(value) if self.integer else float(value)
            except (TypeError, ValueError):
                what = "a whole number" if self.integer else "a number"
                self.fail(f"{value!r} is not {what}: give one "
                          f"{describe_range(self.lo, self.hi, integer=self.integer, lo_open=self.lo_open)}", param, ctx)
        try:
            return check_number(param.name.rstrip("_") if param else "value", number, self.lo, self.hi,
                                integer=self.integer, lo_open=self.lo_open)
        except InputError as exc:
            self.fail(str(exc), param, ctx)


def _json_option(what: str = "Print the result as one JSON object."):
    """``--json`` (every command that prints a result has it), with what it prints."""
    return click.option("--json", "as_json", is_flag=True, help=what)


def _quantisation_options(fn):
    """``--key-bits`` and ``--route-dim``: how reduced keys are quantised (``init``, ``compact``)."""
    fn = click.option("--route-dim", default=None, type=Num(1),
                      help="Dimensions of the routing key of quantised keys (default: 64, at most half of "
                           "--key-dim).")(fn)
    return click.option("--key-bits", default=None, type=click.Choice(["4", "8"]),
                        help="Keep the reduced keys as 4- or 8-bit codes per dimension, beside a small float "
                             "routing key the index is built on (needs --key-dim): about a third of the bytes, "
                             "docs/compact.md.")(fn)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the write in progress is recorded as failed."""


def _on_sigterm(signum, frame):
    raise Terminated()


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- tok/s" if speed is None else f"{speed:,.0f} tok/s", style="cyan")


class _Group(click.Group):
    """Turns KnnstoreError into `Error: <message>` and exit code 1, Ctrl-C into 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KnnstoreError as exc:
            raise click.ClickException(_safe(exc)) from None
        except (OSError, RuntimeError, ValueError) as exc:  # an object store failing: one line too
            from .location import storage_failure

            failure = storage_failure(exc)
            if failure is None:
                raise
            raise click.ClickException(_safe(f"the object store failed ({failure}): nothing more was "
                                             "written; check that it is reachable and retry "
                                             "(`knnstore check STORE` shows the state)")) from None
        except KeyboardInterrupt as exc:
            what = "Terminated." if isinstance(exc, Terminated) else "Interrupted."
            err.print(Text(what, style="red"), "Anything half-written stays invisible; "
                      "`knnstore list` shows what to resume or remove.")
            sys.exit(143 if isinstance(exc, Terminated) else 130)


@contextmanager
def _status(message: str):
    if err.is_terminal:
        with err.status(Text(_safe(message))):  # a str status would be parsed as markup
            yield
    else:
        err.print(_safe(message))
        yield


def _open(path, model=None):
    from .store import Store

    return Store.open(path, model=model, storage_options=_storage_options(), **_device())


def _storage_options() -> dict | None:
    """The --storage-option KEY=VALUE pairs of the command running (``_store_argument``)."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get("knnstore.storage_options") if ctx else None


def _store_argument(f):
    """The STORE argument (a directory, or s3://bucket/prefix, gs://, az://) and
    --storage-option, for every command that opens a store."""
    from .location import parse_storage_options

    @functools.wraps(f)
    def run(*args, storage_option, **kwargs):
        try:
            options = parse_storage_options(storage_option)
        except InputError as exc:
            raise click.BadParameter(str(exc), param_hint="'--storage-option'") from None
        click.get_current_context().meta["knnstore.storage_options"] = options or None
        return f(*args, **kwargs)

    run = click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
                       help="For a store on an object store: an option for its client, e.g. "
                            "aws_endpoint=http://127.0.0.1:9000 or aws_region=eu-west-1 (repeatable; "
                            "default: the standard environment variables such as AWS_ENDPOINT_URL). "
                            "Never recorded with the store.")(run)
    return click.argument("store", type=click.Path())(run)


def _device() -> dict:
    """The --device / --compute-dtype of the command running (``_device_options``)."""
    ctx = click.get_current_context(silent=True)
    device, compute_dtype = (ctx.meta.get("knnstore.device") if ctx else None) or ("auto", "auto")
    return {"device": device, "compute_dtype": compute_dtype}


def _check_device(ctx, param, value):
    from .devices import resolve_device

    try:
        resolve_device(value)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _ray_options(f):
    """--workers and --ray-address: encode on Ray (add-corpus, resume-corpus)."""
    from .distributed import MAX_WORKERS

    f = click.option("--ray-address", default=None,
                     help="Encode on the Ray cluster at ADDRESS (default: RAY_ADDRESS if set, else a "
                          "local Ray runtime with --workers).")(f)
    return click.option("--workers", type=Num(1, MAX_WORKERS), default=None,
                        help="Encode on N Ray workers (needs knnstore[ray]); the corpus's pairs are "
                             "committed at once when all are encoded.")(f)


def _purge_option(f):
    return click.option("--purge", is_flag=True,
                        help="Then take the removed rows off the disk too (as `knnstore purge`).")(f)


def _print_purge(done: dict) -> None:
    from rich.filesize import decimal

    out.print(f"Purged: {done['fragments_rewritten']:,} data fragments rewritten into "
              f"{done['fragments_written']:,}, {done['versions_dropped']:,} old versions dropped; table "
              f"{decimal(done['bytes_before'])} -> {decimal(done['bytes_after'])}")


def _device_options(f):
    """--device and --compute-dtype, for the commands that load the model."""
    from .devices import COMPUTE_DTYPES

    @functools.wraps(f)
    def run(*args, device, compute_dtype, **kwargs):
        click.get_current_context().meta["knnstore.device"] = (device, compute_dtype)
        return f(*args, **kwargs)

    run = click.option("--compute-dtype", type=click.Choice(["auto", *COMPUTE_DTYPES]), default="auto",
                       show_default=True,
                       help="The model's float type: auto = float32 on the CPU, bfloat16 (or float16) "
                            "on a GPU. Keys are stored in the store's dtype either way.")(run)
    return click.option("--device", default="auto", show_default=True, callback=_check_device,
                        help="Where the model runs: auto (a GPU when there is one), cpu, cuda, "
                             "cuda:N or mps.")(run)


def _load_model(store) -> None:
    with _status(f"Loading model {store.identity.model}..."):
        store.encoder  # noqa: B018  (loads and checks it)


LOG_EVERY_S = 30.0  # a progress line this often when stderr is not a terminal


@contextmanager
def _progress(description: str):
    """A progress bar on a terminal; elsewhere (a log file, CI) a plain line every
    LOG_EVERY_S seconds and one at the end, so long work never looks hung."""
    if not err.is_terminal:
        start = last = time.monotonic()
        finished = False

        def log(done: int, total: int) -> None:
            nonlocal last, finished
            now = time.monotonic()
            end = done >= total > 0
            if not finished and (end or now - last >= LOG_EVERY_S):
                last, finished = now, end
                rate = done / max(now - start, 1e-9)
                err.print(f"{_safe(description)}: {done:,}/{total:,} tokens ({100 * done // max(total, 1)}%), "
                          f"{rate:,.0f} tok/s, {now - start:,.0f} s")

        yield log
        return
    progress = Progress(
        TextColumn("{task.description}", markup=False, style="bold"), BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens", markup=False), _TokensPerSecond(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err,
    )
    with progress:
        task = progress.add_task(_safe(description), total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="knnstore")
def cli():
    """knnstore: an embedded datastore for kNN language models.

    \b
    Quick start:
        knnstore init my-store
        knnstore add-corpus my-store wiki valid.txt --split-on-heading
        knnstore list my-store
    """


@cli.command()
@_store_argument
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Model alias (smollm2-135m), Hugging Face id or local directory.")
@click.option("--key-layer", default=-1, show_default=True, type=Num(),
              help="Decoder layer whose feed-forward input is the key; negative counts from the end.")
@click.option("--key-site", default="ffn_input", show_default=True, type=click.Choice(KEY_SITES))
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(DTYPES),
              help="How key vectors are stored.")
@click.option("--key-dim", default=None, type=Num(1),
              help="Store keys reduced to this many dimensions (PCA fitted on the first corpus's keys; "
                   "default: the model's own keys). Smaller stores, slightly higher perplexity: docs/compact.md.")
@_quantisation_options
@click.option("--catalog-url", default=None,
              help="SQLAlchemy URL of the catalog (default: SQLite file inside STORE; required for "
                   "a store on an object store: PostgreSQL to share it between machines).")
@_device_options
def init(store, model, key_layer, key_site, dtype, key_dim, key_bits, route_dim, catalog_url):
    """Create an empty store for a model.

    \b
    Examples:
        knnstore init wiki-store --model smollm2-135m
        knnstore init small-store --key-dim 128
        knnstore init tiny-store --key-dim 256 --key-bits 4
    """
    from .store import Store

    with _status(f"Loading model {model}..."):
        s = Store.create(store, model=model, key_layer=key_layer, key_site=key_site,
                         dtype=dtype, catalog_url=catalog_url, storage_options=_storage_options(),
                         key_dim=key_dim, key_bits=None if key_bits is None else int(key_bits),
                         route_dim=route_dim, **_device())
    ident = s.identity
    codes = f" as {ident.key_bits}-bit codes, routing key {ident.route_dim} dims" if ident.key_bits else ""
    reduced = f" (stored reduced to {ident.key_dim}{codes}, fitted on the first corpus)" if ident.key_dim else ""
    out.print(f"Created store {_safe(store)}: model {_safe(ident.model)}, key = layer {ident.key_layer} "
              f"{ident.key_site}, dim {ident.dim}{reduced}, {ident.dtype}, vocabulary {ident.vocab_size:,} tokens")


@cli.command("add-corpus")
@_store_argument
@click.argument("name")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--split-on-heading", is_flag=True,
              help="Split .txt files into one document per ' = Title = ' article (WikiText).")
@click.option("--text-field", default="text", show_default=True,
              help="Field (jsonl) or column (parquet, datasets) holding the text.")
@click.option("--max-documents", type=Num(1), default=None,
              help="Take only the first N documents.")
@click.option("--window", type=Num(2, MAX_WINDOW), default=None,
              help=f"Tokens per encoding window [default: {IngestSettings.window}].")
@click.option("--stride", type=Num(1, MAX_WINDOW), default=None,
              help=f"Tokens between window starts [default: {IngestSettings.stride}].")
@click.option("--batch-size", type=Num(1, MAX_BATCH_SIZE), default=None,
              help=f"Windows per forward pass [default: {IngestSettings.batch_size}].")
@click.option("--no-index", is_flag=True,
              help="Leave the ANN index as it is (`knnstore index STORE` applies the index policy later).")
@_json_option('Print the new corpus as JSON.')
@_ray_options
@_device_options
def add_corpus(store, name, paths, split_on_heading, text_field, max_documents, window, stride,
               batch_size, no_index, as_json, workers, ray_address):
    """Encode documents with the store's model and add them as corpus NAME.

    PATHS may be directories of .txt/.md files, .txt/.md files, .jsonl or .parquet files,
    or datasets saved with `save_to_disk`.

    \b
    Example:
        knnstore add-corpus wiki-store wiki valid.txt --split-on-heading
    """
    try:
        settings = IngestSettings.resolve(window=window, stride=stride, batch_size=batch_size)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None
    options = SourceOptions(text_field=text_field, split_on_heading=split_on_heading,
                            max_documents=max_documents)
    s = _open(store)
    s.check_new_corpus(name, paths)  # fail fast, before the model loads
    _load_model(s)
    with _progress(f"Adding {name}") as update:
        info = s.add_corpus(name, paths, options=options, settings=settings, progress=update, index=False,
                            workers=workers, ray_address=ray_address)
    _print_added(info, as_json)
    if not no_index:
        s.maintain_index(watch=_index_watch)


@cli.command("resume-corpus")
@_store_argument
@click.argument("name")
@_json_option('Print the corpus as JSON.')
@_ray_options
@_device_options
def resume_corpus(store, name, as_json, workers, ray_address):
    """Finish adding a corpus whose ingestion was interrupted or failed.

    Documents already committed are kept; the rest are encoded again.

    \b
    Example:
        knnstore resume-corpus wiki-store wiki
    """
    s = _open(store)
    _load_model(s)
    with _progress(f"Resuming {name}") as update:
        info = s.resume_corpus(name, progress=update, index=False, workers=workers, ray_address=ray_address)
    _print_added(info, as_json)
    s.maintain_index(watch=_index_watch)


_INDEX_VERBS = {"train": "Training the index", "retrain": "Re-training the index",
                "update": "Indexing the new rows"}


@contextmanager
def _index_watch(plan):
    """What an index build is doing, on stderr (``indexing.IndexWatch``)."""
    t0 = time.perf_counter()
    if plan.action == "rebuild":
        with _status(f"Training the index on {plan.reason}..."):
            yield
        err.print(f"Trained the index in {time.perf_counter() - t0:.1f} s")
        return
    with _status(f"{_INDEX_VERBS[plan.action]} ({plan.reason})..."):
        yield
    err.print(f"{_INDEX_VERBS[plan.action]}: done in {time.perf_counter() - t0:.1f} s ({plan.reason})")


def _print_added(info, as_json: bool) -> None:
    from .ingest import describe_skipped

    if info.skipped:
        err.print(Text("Note:", style="yellow"), f"skipped {len(info.skipped)} file(s) that are binary, "
                  f"not UTF-8 or empty (left out of the corpus, unchanged on disk): "
                  f"{_safe(describe_skipped(info.skipped))}")
    if as_json:
        _echo_json(info.to_dict())
    else:
        out.print(f"Corpus {_safe(info.name)}: {info.documents:,} documents, {info.tokens:,} tokens, "
                  f"{info.pairs:,} pairs ({info.status})")


@cli.command("remove-corpus")
@_store_argument
@click.argument("name")
@_purge_option
def remove_corpus(store, name, purge):
    """Delete corpus NAME: its pairs and catalog rows. The index is not rebuilt.

    \b
    Example:
        knnstore remove-corpus wiki-store wiki
    """
    s = _open(store)
    info = s.corpus(name)
    s.remove_corpus(name)
    out.print(f"Removed corpus {_safe(info.name)}: {info.documents:,} documents, {info.pairs:,} pairs")
    if purge:
        _print_purge(s.purge())


CONFIRM_ABOVE = 1000  # documents one remove-documents may take without --yes


@cli.command("remove-documents")
@_store_argument
@click.option("--where", "where", required=True,
              help="SQL condition over the documents view (columns as `knnstore sql` shows them: "
                   "document_id, path, title, corpus, metadata, ...), e.g. \"path LIKE '%/2019/%'\".")
@click.option("--corpus", "corpus", default=None, help="Only documents of this corpus.")
@click.option("--dry-run", is_flag=True, help="Show what would be removed; change nothing.")
@click.option("--yes", is_flag=True, help=f"Remove even when the condition matches every document of the store "
                                          f"or more than {CONFIRM_ABOVE:,} (refused without it).")
@_json_option('Print the removal as one JSON object.')
@_purge_option
def remove_documents(store, where, corpus, dry_run, as_json, purge, yes):
    """Delete the documents matching a condition, and their pairs, without a rebuild.

    The condition is evaluated by the read-only SQL sandbox over the documents view. The
    pairs go in one commit; corpus counts are updated; the index is not rebuilt. A
    condition that matches nothing is an error and changes nothing.

    \b
    Examples:
        knnstore remove-documents wiki-store --where "document_id IN (3, 7)" --dry-run
        knnstore remove-documents wiki-store --where "json_extract(metadata, '$.author') = 'X'"
    """
    s = _open(store)
    removal = s.remove_documents(where, corpus, dry_run=dry_run, refuse_above=None if yes else CONFIRM_ABOVE)
    purged = s.purge() if purge and not dry_run else None
    if as_json:
        _echo_json({**removal.to_dict(), **({"purge": purged} if purged is not None else {})})
        return
    verb = "Would remove" if dry_run else "Removed"
    out.print(f"{verb} {len(removal.documents):,} documents, {removal.pairs:,} pairs")
    for d in removal.documents[:20]:
        shown = f"{d['title']}  ({d['source']})" if d["title"] else d["source"]
        out.print(Text(_safe(f"  {d['id']}  {d['corpus']}  {shown}  {d['n_pairs']:,} pairs")))
    if len(removal.documents) > 20:
        out.print(f"  ... and {len(removal.documents) - 20:,} more (--json lists them all)")
    if purged is not None:
        _print_purge(purged)


@cli.command()
@_store_argument
@click.option("--text", "text", required=True, help="The text to forget, e.g. an e-mail address or a name.")
@click.option("--ignore-case", is_flag=True, help="Match it in any case.")
@click.option("--context", type=Num(0, MAX_WINDOW), default=0, show_default=True,
              help="Also remove the pairs that have a token of it among their last N context tokens.")
@click.option("--documents", is_flag=True, help="Remove the whole documents that contain it instead.")
@click.option("--dry-run", is_flag=True, help="Show what would be removed; change nothing.")
@_json_option()
@_purge_option
def forget(store, text, ignore_case, context, documents, dry_run, as_json, purge):
    """Remove a text (personal data, a secret) wherever a stored document contains it.

    Every occurrence is found in the documents' decoded text (not by token ids, which
    depend on what precedes the text), and every pair whose next token overlaps one is
    deleted, so the store can no longer put any token of it into a prediction. Titles,
    paths and metadata that hold it are redacted. Matching is after Unicode normalisation
    (NFKC, zero-width characters dropped). The catalog keeps a salted hash of the text,
    never the text. --purge takes the rows off the disk.

    \b
    Examples:
        knnstore forget wiki-store --text "jane.doe@example.com" --dry-run
        knnstore forget wiki-store --text "Jane Doe" --ignore-case --context 8 --purge
    """
    s = _open(store)
    done = s.forget(text, ignore_case=ignore_case, context=context, documents=documents, dry_run=dry_run)
    purged = s.purge() if purge and not dry_run else None
    if as_json:
        _echo_json({**done.to_dict(), **({"purge": purged} if purged is not None else {})})
        return
    verb = "Would remove" if dry_run else "Removed"
    what = f"{done.pairs_removed:,} pairs" + (" (whole documents)" if documents else "")
    out.print(f"{verb} {what}: {done.occurrences:,} occurrences in {done.documents:,} documents")
    if done.in_catalog:
        out.print(f"{'Would redact' if dry_run else 'Redacted'} it from {done.in_catalog:,} catalog fields "
                  "(titles, paths, metadata)")
    if done.pruned_corpora:
        err.print(Text(_safe(f"warning: {', '.join(done.pruned_corpora)} was pruned: merged pairs no longer spell "
                             "their text, so more of it may be carried there unseen; remove the documents that "
                             "held it to be sure"), style="yellow"))
    for d in done.by_document[:20]:
        out.print(Text(_safe(f"  {d['document_id']}  {d['corpus']}  {d['source']}  {d['occurrences']} occurrences, "
                             f"{d['pairs']:,} pairs")))
    if purged is not None:
        _print_purge(purged)


@cli.command()
@_store_argument
@_json_option('Print what was done as one JSON object.')
def purge(store, as_json):
    """Take removed rows off the disk: rewrite the data files that still hold deleted rows,
    drop old table versions, vacuum the catalog.

    Removals (remove-documents, remove-corpus) are logical until then: the rows are out of
    every search and query, but old data files and versions still hold them. A reader that
    holds a snapshot from before the purge must reopen the store.

    \b
    Example:
        knnstore purge wiki-store
    """
    done = _open(store).purge()
    if as_json:
        _echo_json(done)
    else:
        _print_purge(done)


@cli.command()
@_store_argument
@click.option("--corpus", "corpus", default=None, help="Only this corpus (default: every ready corpus).")
@click.option("--neighbours", type=Num(1, MAX_K - 1), default=None,
              help="Nearest pairs each pair looks at for pairs to merge [default: 16]; more removes more.")
@click.option("--exact", is_flag=True, help="Find the neighbours by brute force even where there is an index.")
@click.option("--dry-run", is_flag=True, help="Say how many pairs would go; change nothing.")
@_json_option()
def prune(store, corpus, neighbours, exact, dry_run, as_json):
    """Shrink a store: merge neighbouring pairs that predict the same next token.

    Each pair, in turn, takes its nearest pairs of the same corpus (--neighbours of
    them) that have its next token: they leave the store and the pair kept counts for
    them all (a weight, added to its logit as log weight); a pair that stands for others
    stays. On WikiText-2, 16 neighbours remove 43% of the pairs for +0.5% perplexity
    (docs/compact.md). The rows leave the disk with `knnstore purge`.

    \b
    Example:
        knnstore prune wiki-store --dry-run
    """
    s = _open(store)
    with _progress("Pruning") as progress:
        done = s.prune(corpus, neighbours=neighbours, exact=exact, dry_run=dry_run, progress=progress)
    if as_json:
        _echo_json(done.to_dict())
        return
    verb = "Would merge" if dry_run else "Merged"
    for c in done.corpora:
        out.print(Text(_safe(f"{verb} {c.pairs_before - c.pairs_after:,} of {c.pairs_before:,} pairs of corpus "
                             f"{c.corpus} ({100 * c.removed_fraction:.1f}%), {c.seconds:,.1f} s")))
    if not done.corpora:
        out.print("No ready corpus to prune")


@cli.command()
@_store_argument
@click.option("--key-dim", required=True, type=Num(1),
              help="Dimensions to keep (the leading principal axes of the store's own keys).")
@_quantisation_options
@_json_option()
def compact(store, key_dim, key_bits, route_dim, as_json):
    """Make a store's keys smaller in place: keep their KEY_DIM leading principal axes
    (quantised to --key-bits per dimension if given).

    A PCA of the stored keys is fitted, every key is rewritten projected into a new table,
    the catalog switches to it in one transaction, and the index is trained again. Queries
    stay the model's keys (projected by the store). Deleted rows and old versions do not
    come along. Readers holding the store open must reopen it. On WikiText-2, 256 of 576
    dimensions cost +0.5% perplexity, 128 cost +1.0% (docs/compact.md).

    \b
    Examples:
        knnstore compact wiki-store --key-dim 256
        knnstore compact wiki-store --key-dim 256 --key-bits 4 --route-dim 64
    """
    s = _open(store)
    with _progress("Compacting") as progress:
        done = s.compact(key_dim, progress=progress, key_bits=None if key_bits is None else int(key_bits),
                         route_dim=route_dim)
    if as_json:
        _echo_json(done.to_dict())
        return
    out.print(f"Compacted {done.rows:,} pairs: keys {done.key_dim_before} -> {done.key_dim} dimensions "
              f"({done.projection}); {_human(done.bytes_before)} -> {_human(done.bytes_after)} on disk, "
              f"{done.seconds:,.1f} s")


@cli.command("list")
@_store_argument
@_json_option('One JSON object per corpus, in a list.')
def list_(store, as_json):
    """List the corpora of a store with status, documents, pairs and bytes.

    \b
    Example:
        knnstore list wiki-store --json
    """
    corpora = _open(store).corpora()
    if as_json:
        _echo_json([c.to_dict() for c in corpora])
        return
    if not corpora:
        out.print(_safe(f"{store} holds no corpus yet: add one with `knnstore add-corpus {store} NAME PATH`"))
        return
    table = Table()
    for column in ("corpus", "status", "documents", "tokens", "pairs", "bytes", "added"):
        numeric = column in ("documents", "tokens", "pairs", "bytes")
        table.add_column(column, justify="right" if numeric else "left")
    for c in corpora:
        status = Text(c.status, style=None if c.status == "ready" else "red")
        table.add_row(_safe(c.name), status, f"{c.documents:,}", f"{c.tokens:,}", f"{c.pairs:,}",
                      _human(c.bytes), c.created_at.strftime("%Y-%m-%d %H:%M"))
    out.print(table)
    for c in corpora:
        if c.status != "ready":
            out.print(Text(_safe(c.name), style="red"),
                      _safe(f": {c.status} ({c.error}); run `knnstore resume-corpus {store} {c.name}` or "
                            f"`knnstore remove-corpus {store} {c.name}`"), sep="")


@cli.command()
@_store_argument
@_json_option('Print the figures as one JSON object.')
def stats(store, as_json):
    """Show the model, key site, sizes and index state of a store.

    \b
    Example:
        knnstore stats wiki-store --json
    """
    st = _open(store).stats()
    if as_json:
        _echo_json(st.to_dict())
        return
    table = Table(show_header=False, box=None)
    index = st.index
    index_text = f"{index.describe()}; {index.indexed_rows:,} rows indexed, {index.unindexed_rows:,} not"
    dim = str(st.dim)
    if st.key_dim is not None:
        dim += f", stored as {st.key_dim}: {st.key_projection or 'projection fitted on the first corpus'}"
    pairs = f"{st.pairs:,}" + (" (pruned: some stand for several)" if st.weighted else "")
    for key, value in [
        ("store", st.path), ("model", st.model),
        ("key site", f"layer {st.key_layer} {st.key_site}"), ("dim", dim),
        ("dtype", st.dtype), ("metric", "squared L2" if st.metric == "l2sq" else st.metric),
        ("catalog", st.catalog), ("corpora", f"{st.corpora:,}"), ("documents", f"{st.documents:,}"),
        ("pairs", pairs), ("table rows", f"{st.table_rows:,}"),
        ("bytes on disk", _human(st.bytes_on_disk)),
        ("bytes per pair", "-" if st.bytes_per_pair is None else f"{st.bytes_per_pair:,.0f}"),
        ("index", index_text),
    ]:
        table.add_row(Text(key, style="bold"), _safe(value))
    out.print(table)


class NumList(Num):
    """One number or a comma-separated list of them (a sweep), each checked as ``Num``."""

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        parts = [v.strip() for v in str(value).split(",") if v.strip()]
        if not parts:
            self.fail("expected at least one value", param, ctx)
        try:
            return [super(NumList, self).convert(v, param, ctx) for v in parts]
        except click.BadParameter as exc:
            self.fail(f"{exc.message} (give one number or a comma-separated list)", param, ctx)


def _knn_options(sweep: bool, only: tuple[str, ...] | None = None, helps: dict[str, str] | None = None,
                 decoding: bool = True):
    """The kNN-LM options, one per ``KNNSettings`` field as its ``Setting`` declares it (generate
    and serve take them all, eval and explain all but those of decoding, ``decoding=False``;
    ``only``: those fields; ``helps``: a command's own wording of some), and ``--fixed-lambda``."""
    many = " (a comma-separated list sweeps)" if sweep else ""
    options = []
    for f, declared in settings_of(KNNSettings):
        if (only is not None and f.name not in only) or (declared.decoding and not decoding):
            continue
        default = "none" if f.default is None else show_number(f.default)
        text = (helps or {}).get(f.name, declared.help).format(default=default, many=many)
        if value_type(f) is bool:
            flag = f"{declared.option}/--no-{declared.option[2:]}" if declared.negative else declared.option
            switch = {} if declared.negative else {"is_flag": True}
            options.append(click.option(flag, f.name, default=None, help=text, **switch))
        else:
            kind = NumList if declared.sweep and only is None else Num
            options.append(click.option(declared.option, f.name, help=text,
                                        type=kind(declared.lo, declared.hi, integer=declared.integer,
                                                  lo_open=declared.lo_open)))
    if only is None:
        options.append(click.option("--fixed-lambda", type=Num(0.0, 1.0, integer=False),
                                    help="The plain kNN-LM with this fixed λ (as in the paper), not adaptive: "
                                         "the same as --no-adaptive --lambda L."))

    def decorate(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return decorate


def _knnlm(store, opts: dict, single: bool, policy: bool = True):
    """The adapter for STORE with the kNN options of a command (``_knn_options``); with
    ``policy``, its adaptive policy worked out now (``_resolve_policy``). A command that
    checks its input with the model's tokenizer asks for ``policy=False`` and resolves it
    after the check, so that bad input is refused before a self-calibration writes to the
    store."""
    from .adapter import KNNLM

    lists = {name: opts[key] for name, key in (("--k", "k"), ("--lambda", "lambda_"),
                                                ("--temperature", "temperature"))}
    if single:
        for name, values in lists.items():
            if values is not None and len(values) > 1:
                raise click.BadParameter("takes one value here (sweeps are for `knnstore eval`)",
                                         param_hint=name)
    fixed = opts.pop("fixed_lambda", None)
    if fixed is not None:
        if opts.get("lambda_") is not None:
            raise click.BadParameter("give either --fixed-lambda or --lambda", param_hint="--fixed-lambda")
        if opts.get("adaptive"):
            raise click.BadParameter("--fixed-lambda is the plain kNN-LM: drop --adaptive", param_hint="--fixed-lambda")
        opts = {**opts, "lambda_": [fixed], "adaptive": False}
    first = lambda values: values[0] if values else None  # noqa: E731
    settings = KNNSettings.resolve(**{**opts, **{key: first(opts[key]) for key in ("k", "lambda_", "temperature")}})
    s = _open(store)
    _load_model(s)
    lm = KNNLM.from_store(s, settings)
    return _resolve_policy(lm) if policy else lm


def _resolve_policy(lm):
    """``lm`` with its adaptive policy worked out: a self-calibration, where the store needs
    one, with a progress bar, and what the adapter has to say about it."""
    if lm.needs_calibration():
        with _progress("Calibrating on the store's own text (once: saved in the store)") as update:
            lm.resolve_policy(progress=update)
        if lm.policy_note:
            err.print(lm.policy_note)
    return lm


def _read_text_arg(path) -> str:
    from pathlib import Path

    from .ingest import NotText, read_text_file

    try:
        text = read_text_file(Path(path))
    except NotText as exc:
        raise click.ClickException(f"{path} is not UTF-8 text ({exc}): give a UTF-8 text file") from None
    if not text.strip():
        raise click.ClickException(f"{path} is empty: give a text to score")
    return text


@cli.command("eval")
@_store_argument
@click.option("--text", "text_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="UTF-8 text file to score (one token stream).")
@_knn_options(sweep=True, decoding=False)
@click.option("--max-tokens", type=Num(1), help="Score only the first N tokens of the text.")
@click.option("--window", default=SCORE_WINDOW, show_default=True, type=Num(2, MAX_WINDOW),
              help="Tokens per scoring window.")
@click.option("--stride", default=SCORE_STRIDE, show_default=True, type=Num(1, MAX_WINDOW),
              help="Step between windows; each token is scored once, with at least window - stride tokens of context.")
@click.option("--sweep-out", default="knnstore-sweep", show_default=True,
              help="With a sweep: write PREFIX.csv and PREFIX.png (the PNG needs knnstore[plot]).")
@_json_option()
@_device_options
def eval_(store, text_path, max_tokens, window, stride, sweep_out, as_json, **knn_opts):
    """Perplexity of a text with and without the store, side by side.

    Prints the base LM's perplexity, the kNN-LM's and p_kNN's alone, on the same tokens,
    with both throughputs. Several values for --lambda, --k or --temperature sweep every
    combination in one pass and write a CSV and a PNG plot.

    \b
    Example:
        knnstore eval wiki-store --text test.txt --max-tokens 20000
        knnstore eval wiki-store --text test.txt --lambda 0.1,0.25,0.5 --k 8,64,256
        knnstore eval wiki-store --text other-domain.txt --adaptive
    """
    from .evaluate import check_sweep_prefix
    from .scoring import check_windows

    check_windows(window, stride)  # before the model loads
    sweeping = any(len(knn_opts[key] or []) > 1 for key in ("k", "lambda_", "temperature"))
    if sweeping or click.get_current_context().get_parameter_source("sweep_out").name != "DEFAULT":
        check_sweep_prefix(sweep_out)  # before any scoring: a sweep must be writable
    from .evaluate import token_ids

    text = _read_text_arg(text_path)
    lm = _knnlm(store, knn_opts, single=False, policy=False)
    ids = token_ids(lm, text, max_tokens)
    _resolve_policy(lm)
    with _progress("Scoring") as update:
        result = lm.evaluate(ids, lambdas=knn_opts["lambda_"], ks=knn_opts["k"],
                             temperatures=knn_opts["temperature"],
                             max_tokens=max_tokens, window=window, stride=stride, progress=update)
    files = None
    if result.sweep:
        from .evaluate import write_sweep

        files = write_sweep(result, sweep_out)
    if as_json:
        d = result.to_dict()
        if files:
            d["sweep_files"] = [str(f) for f in files]
        _echo_json(d)
        return
    _print_eval(result, files)


def _print_eval(r, files) -> None:
    fmt = lambda x: "inf" if x == float("inf") else f"{x:,.2f}"  # noqa: E731
    table = Table()
    for column in ("", "perplexity", "tokens/s"):
        table.add_column(column, justify="left" if not column else "right")
    table.add_row("base LM", fmt(r.base_ppl), f"{r.base_tokens_per_s:,.0f}")
    if r.adaptive:
        table.add_row(f"kNN-LM, fixed λ={r.lambda_:g} (k={r.k}, T={r.temperature:g})", fmt(r.fixed_knn_ppl), "")
        table.add_row(f"kNN-LM, adaptive λ (mean {r.mean_lambda:.3f})", fmt(r.knn_ppl),
                      f"{r.knn_tokens_per_s:,.0f}")
    else:
        table.add_row(f"kNN-LM (λ={r.lambda_:g}, k={r.k}, T={r.temperature:g})", fmt(r.knn_ppl),
                      f"{r.knn_tokens_per_s:,.0f}")
    table.add_row("kNN only", fmt(r.knn_only_ppl), "")
    out.print(table)
    if r.adaptive:
        out.print(f"adaptive: {r.adaptive}")
    change = 100 * (r.knn_ppl / r.base_ppl - 1)
    out.print(f"{r.tokens:,} tokens, {r.search} search; kNN-LM perplexity {change:+.1f}% vs base; "
              f"target among the neighbours' next tokens at {100 * r.knn_coverage:.1f}% of positions; "
              f"retrieved at {100 * r.retrieved_fraction:.1f}% of positions"
              + (f" ({100 * r.followed_fraction:.1f}% of them from followed pairs)" if r.followed_fraction else "")
              + f"; throughput kNN-LM ÷ base = {r.speed_ratio:.2f}")
    if r.sweep:
        table = Table(title="sweep")
        columns = ("lambda", "k", "T", "perplexity") + (("adaptive",) if r.adaptive else ())
        for column in columns:
            table.add_column(column, justify="right")
        for p in r.sweep:
            best = p.lambda_ == r.lambda_ and p.k == r.k and p.temperature == r.temperature
            style = "bold green" if best else None
            extra = (fmt(p.adaptive_ppl),) if r.adaptive else ()
            table.add_row(f"{p.lambda_:g}", str(p.k), f"{p.temperature:g}", fmt(p.knn_ppl), *extra, style=style)
        out.print(table)
    if files:
        out.print(f"Wrote {' and '.join(map(str, files))}")
        if len(files) == 1:
            err.print("No plot: install matplotlib (pip install 'knnstore[plot]') for the PNG")


@cli.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                          "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def lm_eval_(ctx, args):
    """lm-evaluation-harness's own command line, with the `knnstore` model in it.

    Takes exactly `lm_eval`'s arguments (`knnstore lm-eval run --help` lists them); the harness
    loads no models from other packages, so this command registers knnstore's first. Where
    no --include_path is given, knnstore's task files are included: knnstore_facts (the
    fact benchmark's probes) and knnstore_text_ppl (perplexity over a local text file).
    Needs the eval extra: pip install 'knnstore[eval]'.

    \b
    Example:
        knnstore add-corpus my-store facts "$(knnstore lm-eval --tasks-dir)/facts_documents.jsonl"
        knnstore lm-eval --model knnstore --model_args store=my-store --tasks knnstore_facts
        knnstore lm-eval --model knnstore --model_args store=my-store,lambda=0.25 \\
            --tasks knnstore_text_ppl --metadata '{"path": "test.txt"}'
    """
    args = list(args)
    if args in (["--help"], ["-h"]):
        out.print(ctx.get_help(), markup=False, highlight=False, soft_wrap=True)
        return
    try:
        from . import lm_eval as harness
    except ImportError as exc:
        raise click.ClickException(f"{exc}") from None
    if args == ["--tasks-dir"]:
        out.print(str(harness.task_dir()), markup=False, highlight=False, soft_wrap=True)
        return
    if "--include_path" not in args and not any(a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(harness.task_dir())]
    harness.main(args)


@cli.command()
@_store_argument
@click.argument("prompt")
@click.option("--max-new-tokens", default=40, show_default=True, type=Num(1, MAX_NEW_TOKENS), help="Tokens to generate.")
@_knn_options(sweep=False)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--top-p", type=Num(0.0, 1.0, integer=False, lo_open=True),
              help="With --sample: nucleus sampling over the mixture.")
@click.option("--num-beams", default=1, show_default=True, type=Num(1, MAX_BEAMS), help="Beam search with this many beams.")
@click.option("--seed", type=Num(0, MAX_SEED), help="Random seed for --sample.")
@click.option("--explain", is_flag=True, help="Show the source documents of each generated token.")
@click.option("--sources", "n_sources", default=3, show_default=True, type=Num(0, MAX_K),
              help="With --explain: neighbours shown per token.")
@_json_option()
@_device_options
def generate(store, prompt, max_new_tokens, sample, top_p, num_beams, seed, explain, n_sources,
             as_json, **knn_opts):
    """Continue PROMPT with the kNN-LM (greedy unless --sample).

    \b
    Example:
        knnstore generate wiki-store "The tower was built in" --max-new-tokens 30 --explain
    """
    if explain and num_beams > 1:
        raise click.BadParameter("--explain works with greedy search and sampling, not beams",
                                 param_hint="--num-beams")
    if not prompt.strip():
        raise click.BadParameter("the prompt is empty: give at least one word", param_hint="PROMPT")
    lm = _knnlm(store, knn_opts, single=True)
    g = lm.generate(prompt, max_new_tokens=max_new_tokens, do_sample=sample, top_p=top_p,
                    num_beams=num_beams, seed=seed, explain=explain or as_json, n_sources=n_sources)
    if as_json:
        _echo_json(g.to_dict())
        return
    out.print(Text(_safe(prompt), style="bold") + Text(_safe(g.text)))
    for p in g.read:
        err.print(Text(f"read first: {p.corpus}: {_safe(p.title or p.document)} "
                       f"(positions {p.start_position}-{p.end_position}, {p.score:.0f} nats)"))
    if explain:
        _print_explanations(g.tokens)
        _print_spans(g.spans)
    cost = g.cost
    drafted = (f"; {cost['drafted_accepted']} of {cost['drafted_proposed']} drafted tokens kept, "
               f"{cost['tokens_per_model_call']:.2f} tokens per model call" if cost.get("drafted_proposed") else "")
    searched = f", {cost['searches_per_token']:.2f} searches per token" if cost else ""
    err.print(f"retrieved at {100 * g.retrieved_fraction:.0f}% of steps{searched}{drafted}")


@cli.command()
@_store_argument
@click.argument("text")
@_knn_options(sweep=False, decoding=False)
@click.option("--sources", "n_sources", default=3, show_default=True, type=Num(0, MAX_K),
              help="Neighbours shown per token.")
@_json_option('Print one JSON object per token, in a list.')
@click.option("--spans", "with_spans", is_flag=True,
              help="With --json: print {\"tokens\": [...], \"spans\": [...]} (passages followed "
                   "token after token, each once); the text output always shows them.")
@_device_options
def explain(store, text, n_sources, as_json, with_spans, **knn_opts):
    """Score TEXT and show, for each token, its probability and the stored sources behind it.

    \b
    Example:
        knnstore explain wiki-store "The tower was built in 1889"
    """
    lm = _knnlm(store, knn_opts, single=True, policy=False)
    ids = lm.explain_ids(text)
    _resolve_policy(lm)
    tokens = lm.explain(ids, n_sources=n_sources)
    if as_json:
        listed = [t.to_dict() for t in tokens]
        _echo_json({"tokens": listed, "spans": [sp.to_dict() for sp in lm.spans(tokens)]} if with_spans else listed)
        return
    _print_explanations(tokens)
    _print_spans(lm.spans(tokens))


@cli.command()
@_store_argument
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; any other than loopback needs --api-key.")
@click.option("--port", default=8000, show_default=True, type=Num(1, 65535), help="TCP port.")
@click.option("--api-key", help="Require 'Authorization: Bearer KEY' on every endpoint "
                                "[default: KNNSTORE_API_KEY if set, else none].")
@click.option("--max-batch", default=8, show_default=True, type=Num(1, 256),
              help="Choices decoded together in one batch (requests with the same kNN settings).")
@click.option("--max-queue", default=64, show_default=True, type=Num(1, 100_000),
              help="Requests that may wait; beyond that the server answers 503.")
@_knn_options(sweep=False)
@_device_options
def serve(store, host, port, api_key, max_batch, max_queue, **knn_opts):
    """Serve the kNN-LM over HTTP: an OpenAI-compatible API and a web page at /.

    \b
    Endpoints: POST /v1/completions, POST /v1/chat/completions (stream, n, seed, stop;
    kNN fields lambda, k, knn_temperature, adaptive, read, follow, explain), GET /v1/models, GET /health,
    read-only GET /v1/store, /v1/store/corpora, /v1/store/documents, POST /v1/store/sql.
    The kNN options below are the defaults of requests that do not set them.

    \b
    Example:
        knnstore serve wiki-store --port 8000     # then open http://127.0.0.1:8000/
    """
    from .config import env
    from .server import check_address, serve as run_server

    if api_key is None:
        api_key = env("api_key")
    check_address(host, port, api_key)  # before the model loads
    lm = _knnlm(store, knn_opts, single=True)
    err.print(f"Serving {lm.store.identity.model} with {_safe(str(lm.store.path))} on http://{host}:{port}/ "
              f"(the page at /, the API under /v1; Ctrl-C stops)")
    run_server(lm, host=host, port=port, api_key=api_key, max_batch=max_batch, max_queue=max_queue)


@cli.command()
@_store_argument
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False),
              help="Held-out UTF-8 text of the store's own domain (not text stored in it).")
@click.option("--max-tokens", type=Num(100),
              help="Fit on at most the first N tokens of the text [default: 20,000]; without --text, "
                   "score N positions of the store's own text [default: 16,384, at most what it holds].")
@click.option("--kind", type=click.Choice(["logistic", "mlp"]), default="logistic", show_default=True,
              help="The map from signals to λ: logistic regression or a 16-unit MLP.")
@click.option("--keep", type=Num(0.0, 1.0, integer=False, lo_open=True), default=0.9, show_default=True,
              help="Skip retrieval wherever that keeps this fraction of the best fixed λ's gain "
                   "on the text.")
@_knn_options(sweep=False, only=("k", "lambda_", "temperature", "exact", "follow"),
              helps={"lambda_": "The fixed λ to start from and compare with [default: {default}].",
                     "temperature": "T of p_kNN [default: {default}].",
                     "exact": "Brute-force search instead of the ANN index."})
@click.option("--clear", is_flag=True, help="Delete the store's calibrations (adaptive λ then calibrates on the "
                                           "store's own text again at its next use).")
@_json_option()
@_device_options
def calibrate(store, text_path, max_tokens, kind, keep, k, lambda_, temperature, exact, follow, clear, as_json):
    """Fit adaptive interpolation (--adaptive) for STORE, on held-out text or on the
    store's own text, and save it.

    Scores the text with the store, fits a map from retrieval signals (nearest distance,
    agreement between neighbours, the LM's entropy, ...) to a λ per token that maximises
    the mixture's likelihood, picks where retrieval can be skipped, and stores the fit in
    the catalog. The last 20% of the text is held out from the fit and reported.

    Without --text it calibrates on the store itself: pieces of its own documents, each
    scored with the pairs of its own document (within 4,096 positions of it) hidden from
    the search, as if that text were unseen. No text of your own is needed.

    \b
    Example:
        knnstore calibrate wiki-store                           # on the store's own text
        knnstore calibrate wiki-store --text wiki-heldout.txt   # on held-out text
        knnstore eval wiki-store --text test.txt --adaptive
    """
    from .policies import calibrate as calibrate_store

    if clear:
        s = _open(store)
        n = s.clear_calibrations()
        if as_json:
            _echo_json({"cleared": n})
        else:
            out.print(f"Deleted {n} calibration(s); adaptive λ calibrates on the store's own text at its next use.")
        return
    text = _read_text_arg(text_path) if text_path is not None else None
    opts = {"k": [k] if k else None, "lambda_": [lambda_] if lambda_ is not None else None,
            "temperature": [temperature] if temperature else None, "exact": exact, "follow": follow}
    lm = _knnlm(store, opts, single=True, policy=False)
    with _progress("Calibrating" if text is not None else "Calibrating on the store's own text") as update:
        cal_id, cal = calibrate_store(lm, text, source=str(text_path) if text is not None else None, kind=kind,
                                      keep=keep, max_tokens=max_tokens, progress=update)
    d = {"id": cal_id, **cal.to_dict()}
    if as_json:
        _echo_json(d)
        return
    fmt = lambda x: "-" if x is None else f"{x:,.2f}"  # noqa: E731
    table = Table(title=f"calibration {cal_id}: {cal.describe()}")
    for column in ("tokens", "base LM", f"fixed λ={cal.metrics['fixed_lambda']:g}", "calibrated", "mean λ"):
        table.add_column(column, justify="right")
    for part in ("fit", "holdout"):
        m = d["metrics"][part]
        if m:
            table.add_row(f"{part} {m['tokens']:,}", fmt(m["base_ppl"]), fmt(m["fixed_ppl"]),
                          fmt(m["calibrated_ppl"]), f"{m['mean_lambda']:.3f}")
    out.print(table)
    skip = cal.skip_above_prob
    how = ("skipped by the LM's confidence and the previous position's retrieval" if cal.skip_rule is not None
           else "always" if skip is None else f"skipped where the LM top probability >= {skip:g}")
    out.print(f"retrieval: {how} ({100 * cal.metrics['retrieved_fraction']:.1f}% of positions retrieve). "
              f"Adaptive λ (the default) uses it.")


def _print_spans(spans) -> None:
    """Passages the text follows token after token, each once, as a citation."""
    for sp in spans:
        name = f"{sp.title} ({sp.document})" if sp.title else sp.document
        out.print(Text(_safe(f"tokens {sp.first}-{sp.last} follow {sp.corpus}: {name}, positions "
                             f"{sp.start_position}-{sp.end_position}: \"{' '.join(sp.passage.split())}\"")))


def _print_explanations(tokens) -> None:
    table = Table()
    for column in ("token", "p LM", "p kNN", "p", "top sources (weight)", "stored context behind it"):
        table.add_column(column, justify="right" if column.startswith("p") else "left")
    for t in tokens:
        docs = "; ".join(f"{name} ({w:.2f})" for name, w in t.top_documents(2)) or "-"
        if t.read_from is not None:  # copied from a passage read before the prompt
            docs = f"read: {t.read_from.corpus}: {t.read_from.title or t.read_from.document}; {docs}"
        snippet = " ".join(t.sources[0].snippet.split()) if t.sources else ""
        if t.sources and t.sources[0].next_token != t.token:
            snippet = f"(no neighbour has this token; nearest:) {snippet}"
        # Text(), not markup: stored text may hold [brackets]
        table.add_row(Text(repr(t.text)[1:-1]), f"{t.p_lm:.3f}",
                      "-" if t.p_knn is None else f"{t.p_knn:.3f}", f"{t.p:.3f}", Text(_safe(docs)), Text(_safe(snippet)))
    out.print(table)


@cli.command()
@_store_argument
@click.option("--status", "status_only", is_flag=True, help="Only show the index state and what the policy would do.")
@click.option("--rebuild", is_flag=True, help="Re-train the index now, whatever the policy says.")
@click.option("--type", "index_type", type=click.Choice(list(INDEX_TYPES)),
              help="Index type to train now [default: ivf_rq, 4-bit RaBitQ codes ranked without "
                   "re-reading keys; ivf_pq: smaller codes, re-ranked with exact distances].")
@click.option("--partitions", type=Num(1, MAX_PARTITIONS), help="IVF partitions [default: about sqrt(rows)].")
@click.option("--sub-vectors", type=Num(1, 65536),
              help="PQ sub-vectors, a divisor of the key dimension [default: dim / 8] (implies --type ivf_pq).")
@_json_option('Print the index state as JSON.')
def index(store, status_only, rebuild, index_type, partitions, sub_vectors, as_json):
    """Show or maintain the ANN index (IVF-RQ by default, squared L2) of the stored keys.

    Without flags, applies the index policy: train an index once the store holds
    KNNSTORE_INDEX_MIN_ROWS rows (default 100,000; below it an exact scan takes a few ms),
    index rows added since incrementally (a delta index, no retraining), and retrain
    only when the store has grown KNNSTORE_INDEX_RETRAIN_GROWTH times (default 2) past
    the rows the index was trained on. add-corpus runs the same policy. Rows not yet
    indexed are still searched (exactly); removed corpora are never returned.

    \b
    Example:
        knnstore index wiki-store --status
        knnstore index wiki-store            # apply the policy
        knnstore index wiki-store --rebuild  # train now, e.g. on a small store
        knnstore index wiki-store --type ivf_pq --sub-vectors 72
    """
    s = _open(store)
    if not status_only:
        s.index(rebuild=rebuild, index_type=index_type, num_partitions=partitions, num_sub_vectors=sub_vectors,
                watch=_index_watch)
    plan = s.index_plan()
    state = s.table.index_state()
    if as_json:
        _echo_json({**plan.to_dict(), "indices": state.to_dict()["indices"]})
        return
    kinds = state.describe()
    trained = f"; trained on {plan.trained_rows:,} rows" if plan.trained_rows else ""
    out.print(f"index: {kinds}; {plan.indexed_rows:,} rows indexed, {plan.unindexed_rows:,} not{trained}")
    out.print(f"policy: {plan.action} ({plan.reason})")


@cli.command()
@_store_argument
@click.argument("query", required=False)
@click.option("--format", "fmt", default="table", show_default=True,
              type=click.Choice(["table", "csv", "json", "parquet"]),
              help="Output format; json is a list of row objects; parquet needs --output.")
@click.option("--output", "output", type=click.Path(dir_okay=False),
              help="Write the result to this file instead of the terminal.")
@click.option("--max-rows", default=50, show_default=True, type=Num(0),
              help="Rows shown in table format (the other formats write every row).")
@click.option("--timeout", type=Num(0.0, None, integer=False, lo_open=True), default=SQL_TIMEOUT_S,
              show_default=True, help="Seconds a statement may run before it is stopped.")
@click.option("--row-limit", type=Num(1), default=SQL_MAX_ROWS, show_default=True,
              help="Rows of a result read at most (the rest is left unread, with a warning).")
@click.option("--memory", default=SQL_MEMORY, show_default=True,
              help="Memory a statement's joins and sorts may use (e.g. 512MB, 4GB).")
def sql(store, query, fmt, output, max_rows, timeout, row_limit, memory):
    """Run a read-only SQL query over a store (DuckDB); without QUERY, an interactive prompt.

    \b
    Views:
      pairs      pair_id, corpus, corpus_id, document_id, position, token, token_text,
                 next_token, next_token_text, vector (float32; read only when selected)
      documents  id, corpus, corpus_id, ordinal, source, title, sha256, n_tokens, n_pairs,
                 status, metadata
      corpora    id, name, status, source, n_documents, n_tokens, n_pairs, created_at, ready_at
      vocab      token_id, piece, text
      runs       id, corpus_id, corpus_name, kind, status, started_at, finished_at, error, ...
    Only SELECT runs: anything that would change the store or reach outside it is refused.

    \b
    Example:
        knnstore sql wiki-store "SELECT next_token_text, count(*) AS n FROM pairs GROUP BY 1 ORDER BY n DESC LIMIT 10"
        knnstore sql wiki-store "SELECT title, n_pairs FROM documents ORDER BY n_pairs DESC" --format csv
    """
    from .outputs import check_output_path

    if fmt == "parquet" and not output:
        raise click.BadParameter("parquet is binary: give --output FILE", param_hint="--format")
    if output:
        check_output_path(output)  # before the query runs: never into a store
    from .sql import SQLLimits

    limits = SQLLimits(timeout_s=timeout, max_rows=row_limit, memory=memory)
    with _open(store).sql_session(limits) as session:
        if query is not None:
            _emit(_limited(session, query), fmt, output, max_rows)
            return
        _interactive(session, fmt, max_rows)


def _limited(session, query: str):
    """The statement's rows, at most the session's row limit (a warning says when more were left)."""
    result = session.run(query)
    if result.truncated:
        err.print(f"[yellow]warning:[/] the result was cut at {result.table.num_rows:,} rows (--row-limit "
                  "raises it)")
    return result.table


def _emit(table, fmt: str, output, max_rows: int) -> None:
    from .sql import write_result

    if output:
        from .outputs import atomic_output

        with atomic_output(output) as f:
            write_result(table, "csv" if fmt == "table" else fmt, f)
        err.print(f"Wrote {table.num_rows:,} rows to {_safe(output)}")
    elif fmt == "table":
        _print_rows(table, max_rows)
    else:
        write_result(table, fmt, sys.stdout.buffer)
        sys.stdout.flush()


def _cell(value) -> Text:
    if isinstance(value, list):
        shown = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value[:4])
        return Text(f"[{shown}{', …' if len(value) > 4 else ''}] ({len(value)})")
    text = "" if value is None else repr(value)[1:-1] if isinstance(value, str) else str(value)
    return Text(text if len(text) <= 80 else text[:79] + "…")


def _print_rows(table, max_rows: int) -> None:
    grid = Table()
    for field in table.schema:
        numeric = str(field.type).startswith(("int", "uint", "float", "double", "decimal"))
        grid.add_column(field.name, justify="right" if numeric else "left")
    for row in table.slice(0, max_rows).to_pylist():
        grid.add_row(*(_cell(v) for v in row.values()))
    out.print(grid)
    more = table.num_rows - max_rows
    out.print(f"{table.num_rows:,} rows" + (f" ({more:,} not shown: use --max-rows, or --format csv)" if more > 0 else ""))


def _interactive(session, fmt: str, max_rows: int) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # not on every platform
        pass
    err.print("knnstore sql: read-only SQL over the views pairs, documents, corpora, vocab, runs. "
              "End a statement with ';'. Quit with .quit or Ctrl-D.")
    buffer: list[str] = []
    while True:
        try:
            line = input("knnstore> " if not buffer else "     ...> ")
        except EOFError:
            err.print()
            return
        if not buffer and line.strip() in (".quit", ".exit", "quit", "exit"):
            return
        buffer.append(line)
        statement = "\n".join(buffer).strip()
        if not statement.endswith(";"):
            continue
        buffer = []
        try:
            _emit(_limited(session, statement.rstrip(";")), fmt, None, max_rows)
        except KnnstoreError as exc:
            err.print(Text(f"Error: {_safe(exc)}", style="red"))


@cli.command()
@_store_argument
@click.option("--repair", is_flag=True,
              help="Fix what can be fixed without touching ready corpora (takes the write lock).")
@_json_option('Print the report as one JSON object.')
def check(store, repair, as_json):
    """Check that the catalog and the vector table agree; exit 1 if something is wrong.

    Compares pair counts per corpus and per document, looks for rows no catalog entry owns,
    corpora left half-removed or half-added, the table's schema and the index. With
    --repair: deletes orphan rows, finishes interrupted removals, marks dead ingests failed
    and drops unreferenced data files; ready corpora are never touched.

    \b
    Example:
        knnstore check wiki-store
        knnstore check wiki-store --repair
    """
    from .check import check as run_check
    from .check import damaged
    from .errors import StoreDamagedError, StoreMismatchError

    try:
        opened = _open(store)
    except (StoreDamagedError, StoreMismatchError) as exc:  # a finding, not a crash
        opened, report = None, damaged(store, str(exc))
    if opened is not None:
        report = run_check(opened, repair=repair)
    if as_json:
        _echo_json(report.to_dict())
    else:
        for p in report.problems:
            style = "red" if p.severity == "error" and not p.repaired else "yellow"
            label = "repaired" if p.repaired else p.severity
            fix = f" [--repair: {p.repair}]" if p.repair and not p.repaired else ""
            out.print(Text(_safe(f"{label}: {p.what}{fix}"), style=style))
        verdict = "OK" if report.ok else "PROBLEMS FOUND"
        out.print(f"{verdict}: {report.corpora} corpora, {report.documents:,} documents, "
                  f"{report.table_rows:,} table rows checked")
    if not report.ok:
        sys.exit(1)


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


def _human(n: int) -> str:
    """Bytes in SI units, as labelled (1 MB = 10^6 bytes)."""
    from rich.filesize import decimal

    return decimal(n)


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    cli(prog_name="knnstore")


if __name__ == "__main__":
    main()
