"""The `knnstore` command: each command parses its arguments, calls one library method
and prints. User mistakes (KnnstoreError) become a one-line message and exit code 1;
progress and status go to stderr so that --json output stays clean.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .config import DEFAULT_MODEL, DTYPES, KEY_SITES, IngestSettings, SourceOptions
from .errors import KnnstoreError

err = Console(stderr=True, soft_wrap=True)
# Piped output (scripts, CI logs) gets tables at their natural width, never squeezed.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)


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
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            err.print("[red]Interrupted.[/red] Anything half-written stays invisible; "
                      "`knnstore list` shows what to resume or remove.")
            sys.exit(130)


@contextmanager
def _status(message: str):
    if err.is_terminal:
        with err.status(message):
            yield
    else:
        err.print(message)
        yield


def _open(path, model=None):
    from .store import Store

    return Store.open(path, model=model)


def _load_model(store) -> None:
    with _status(f"Loading model {store.identity.model}..."):
        store.encoder  # noqa: B018  (loads and checks it)


@contextmanager
def _progress(description: str):
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} tokens"), _TokensPerSecond(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, disable=not err.is_terminal,
    )
    with progress:
        task = progress.add_task(description, total=None)

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
@click.argument("store", type=click.Path())
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Model alias (smollm2-135m), Hugging Face id or local directory.")
@click.option("--key-layer", default=-1, show_default=True, type=int,
              help="Decoder layer whose feed-forward input is the key; negative counts from the end.")
@click.option("--key-site", default="ffn_input", show_default=True, type=click.Choice(KEY_SITES))
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(DTYPES),
              help="How key vectors are stored.")
@click.option("--catalog-url", default=None,
              help="SQLAlchemy URL of the catalog (default: SQLite file inside STORE).")
def init(store, model, key_layer, key_site, dtype, catalog_url):
    """Create an empty store for a model.

    \b
    Example:
        knnstore init wiki-store --model smollm2-135m
    """
    from .store import Store

    with _status(f"Loading model {model}..."):
        s = Store.create(store, model=model, key_layer=key_layer, key_site=key_site,
                         dtype=dtype, catalog_url=catalog_url)
    ident = s.identity
    out.print(f"Created store {store}: model {ident.model}, key = layer {ident.key_layer} "
              f"{ident.key_site}, dim {ident.dim}, {ident.dtype}, vocabulary {ident.vocab_size:,} tokens")


@cli.command("add-corpus")
@click.argument("store", type=click.Path())
@click.argument("name")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--split-on-heading", is_flag=True,
              help="Split .txt files into one document per ' = Title = ' article (WikiText).")
@click.option("--text-field", default="text", show_default=True,
              help="Field (jsonl) or column (parquet, datasets) holding the text.")
@click.option("--max-documents", type=click.IntRange(min=1), default=None,
              help="Take only the first N documents.")
@click.option("--window", type=click.IntRange(min=2), default=None,
              help=f"Tokens per encoding window [default: {IngestSettings.window}].")
@click.option("--stride", type=click.IntRange(min=1), default=None,
              help=f"Tokens between window starts [default: {IngestSettings.stride}].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help=f"Windows per forward pass [default: {IngestSettings.batch_size}].")
@click.option("--json", "as_json", is_flag=True, help="Print the new corpus as JSON.")
def add_corpus(store, name, paths, split_on_heading, text_field, max_documents, window, stride,
               batch_size, as_json):
    """Encode documents with the store's model and add them as corpus NAME.

    PATHS may be directories of .txt/.md files, .txt/.md files, .jsonl or .parquet files,
    or datasets saved with `save_to_disk`.

    \b
    Example:
        knnstore add-corpus wiki-store wiki valid.txt --split-on-heading
    """
    try:
        settings = IngestSettings.resolve(window=window, stride=stride, batch_size=batch_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    s = _open(store)
    s.check_new_corpus(name, paths)  # fail fast, before the model loads
    _load_model(s)
    options = SourceOptions(text_field=text_field, split_on_heading=split_on_heading,
                            max_documents=max_documents)
    with _progress(f"Adding {name}") as update:
        info = s.add_corpus(name, paths, options=options, settings=settings, progress=update)
    _print_added(info, as_json)


@cli.command("resume-corpus")
@click.argument("store", type=click.Path())
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the corpus as JSON.")
def resume_corpus(store, name, as_json):
    """Finish adding a corpus whose ingestion was interrupted or failed.

    Documents already committed are kept; the rest are encoded again.

    \b
    Example:
        knnstore resume-corpus wiki-store wiki
    """
    s = _open(store)
    _load_model(s)
    with _progress(f"Resuming {name}") as update:
        info = s.resume_corpus(name, progress=update)
    _print_added(info, as_json)


def _print_added(info, as_json: bool) -> None:
    from .ingest import describe_skipped

    if info.skipped:
        err.print(f"[yellow]Note:[/yellow] skipped {len(info.skipped)} file(s) that are binary, "
                  f"not UTF-8 or empty (left out of the corpus, unchanged on disk): "
                  f"{describe_skipped(info.skipped)}")
    if as_json:
        _echo_json(info.to_dict())
    else:
        out.print(f"Corpus {info.name}: {info.documents:,} documents, {info.tokens:,} tokens, "
                  f"{info.pairs:,} pairs ({info.status})")


@cli.command("remove-corpus")
@click.argument("store", type=click.Path())
@click.argument("name")
def remove_corpus(store, name):
    """Delete corpus NAME: its pairs and catalog rows. The index is not rebuilt.

    \b
    Example:
        knnstore remove-corpus wiki-store wiki
    """
    s = _open(store)
    info = s.corpus(name)
    s.remove_corpus(name)
    out.print(f"Removed corpus {name}: {info.documents:,} documents, {info.pairs:,} pairs")


@cli.command("list")
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="One JSON object per corpus, in a list.")
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
        out.print(f"{store} holds no corpus yet: add one with `knnstore add-corpus {store} NAME PATH`")
        return
    table = Table()
    for column in ("corpus", "status", "documents", "tokens", "pairs", "bytes", "added"):
        numeric = column in ("documents", "tokens", "pairs", "bytes")
        table.add_column(column, justify="right" if numeric else "left")
    for c in corpora:
        status = c.status if c.status == "ready" else f"[red]{c.status}[/red]"
        table.add_row(c.name, status, f"{c.documents:,}", f"{c.tokens:,}", f"{c.pairs:,}",
                      _human(c.bytes), c.created_at.strftime("%Y-%m-%d %H:%M"))
    out.print(table)
    for c in corpora:
        if c.status != "ready":
            out.print(f"[red]{c.name}[/red]: {c.status} ({c.error}); run `knnstore resume-corpus "
                      f"{store} {c.name}` or `knnstore remove-corpus {store} {c.name}`")


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
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
    index_text = (", ".join(i["type"] for i in index["indices"]) or "none (exact search)") + (
        f"; {index['indexed_rows']:,} rows indexed, {index['unindexed_rows']:,} not")
    for key, value in [
        ("store", st.path), ("model", st.model),
        ("key site", f"layer {st.key_layer} {st.key_site}"), ("dim", str(st.dim)),
        ("dtype", st.dtype), ("metric", "squared L2" if st.metric == "l2sq" else st.metric),
        ("catalog", st.catalog), ("corpora", f"{st.corpora:,}"), ("documents", f"{st.documents:,}"),
        ("pairs", f"{st.pairs:,}"), ("table rows", f"{st.table_rows:,}"),
        ("bytes on disk", _human(st.bytes_on_disk)),
        ("bytes per pair", "-" if st.bytes_per_pair is None else f"{st.bytes_per_pair:,.0f}"),
        ("index", index_text),
    ]:
        table.add_row(f"[bold]{key}[/bold]", value)
    out.print(table)


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> None:
    cli(prog_name="knnstore")


if __name__ == "__main__":
    main()
