"""Store format, store identity and tunable settings.

A store is a directory::

    STORE/
      knnstore.json   marker: format version, where the catalog lives, the store id
      catalog.db      the SQL catalog (SQLite, unless a --catalog-url was given)
      vectors/        the LanceDB database holding the table `pairs`

The one process allowed to write locks the directory itself (``lock.py``).

The store's *identity* (model, tokenizer fingerprint, key site, dim, dtype, metric) lives
in the catalog table `store_config` and is never overridden, only checked. *Settings*
(window, stride, batch size...) are passed explicitly and resolve, in order: the caller
(CLI option), a ``KNNSTORE_*`` environment variable, the default here.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from .errors import InputError

FORMAT_VERSION = 1
MARKER_FILE = "knnstore.json"
CATALOG_FILE = "catalog.db"
VECTORS_DIR = "vectors"
PAIRS_TABLE = "pairs"
ProgressFn = Callable[[int, int], None]  # a long job's progress: (done so far, total)


def available_cpus() -> int:
    """The cores this process may run on (its affinity on Linux; else every core)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# What one read-only SQL statement may take by default (``sql.SQLLimits``)
SQL_TIMEOUT_S = 60.0
SQL_MAX_ROWS = 1_000_000  # rows of a result read (`knnstore sql --row-limit`)
SQL_MEMORY = "1GB"

DEFAULT_MODEL = "smollm2-135m"
KEY_SITES = ("ffn_input", "layer_output")
DTYPES = ("float16", "float32")
METRIC = "l2sq"  # squared Euclidean distance between keys


@dataclass(frozen=True)
class StoreIdentity:
    """What a store was built with; a model that differs in any field is refused.

    ``key_layer`` is the resolved, non-negative index of the decoder layer whose
    feed-forward input (``key_site="ffn_input"``) is the key.
    """

    model: str
    model_fingerprint: str  # sha256 of the key layer's weights: same name != same model
    tokenizer_fingerprint: str
    vocab_size: int
    key_layer: int
    key_site: str
    dim: int
    dtype: str
    metric: str = METRIC
    format_version: int = FORMAT_VERSION
    created_at: datetime | None = None
    # Reduced keys (``projection``): the stored keys' dimension, and the sha256 of the
    # projection that makes them (None until it is fitted on the first corpus). None, None:
    # the model's keys as they are.
    key_dim: int | None = None
    key_projection_sha: str | None = None
    # Quantised keys (``projection``): bits per dimension of the stored codes, and the
    # dimension of the float routing key the index is built on. None, None: float keys.
    key_bits: int | None = None
    route_dim: int | None = None

    @property
    def search_dim(self) -> int:
        """The dimension of the keys a search compares (the queries, once projected)."""
        return self.key_dim or self.dim

    @property
    def stored_dim(self) -> int:
        """The dimension of the table's float key column ``vector`` (the routing key of a
        quantised store)."""
        return self.route_dim or self.key_dim or self.dim

    @property
    def code_bytes(self) -> int:
        """Bytes of one key's codes in the table (0: float keys)."""
        return self.search_dim * self.key_bits // 8 if self.key_bits else 0

    def differences(self, other: "StoreIdentity") -> list[str]:
        """Human-readable list of the identity fields in which ``other`` differs."""
        fields = ("tokenizer_fingerprint", "vocab_size", "dim", "key_layer", "key_site",
                  "model_fingerprint")
        out = []
        for name in fields:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                if name.endswith("fingerprint"):
                    mine, theirs = mine[:12], theirs[:12]
                out.append(f"{name} {theirs} (store: {mine})")
        return out


# Bounds of numeric settings, used by the library's checks and the CLI's option types alike.
MAX_K = 4096  # neighbours per position: 4x the paper's largest k; bounds search memory
MAX_BATCH_SIZE = 4096  # windows per forward pass
MAX_NPROBES = MAX_PARTITIONS = 65536  # IVF partitions searched / trained
MAX_REFINE_FACTOR = 100  # candidates re-ranked, times k
MAX_NEW_TOKENS = 100_000  # tokens one generate() call produces
MAX_BEAMS = 64
MAX_SEED = 2**32 - 1
MAX_READ = 8  # documents read before a prompt (``KNNSettings.read``)
DEFAULT_READ = 2


def show_number(x) -> str:
    """A bound as messages and --help show it: 1000000 (not 1e+06), 0.5, 1e-08."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def describe_range(lo=None, hi=None, *, integer: bool = False, lo_open: bool = False) -> str:
    """'between 0 and 1', 'at least 1 and at most 4,096 (a whole number)', 'positive', ...
    (for messages)."""
    def fmt(x) -> str:
        return f"{x:,}" if integer else show_number(x)

    if lo_open and lo == 0 and hi is None:
        text = "positive"
    elif lo_open:
        text = f"in ({fmt(lo)}, {fmt(hi)}]" if hi is not None else f"above {fmt(lo)}"
    elif lo is not None and hi is not None:
        text = f"at least {fmt(lo)} and at most {fmt(hi)}" if integer else f"between {fmt(lo)} and {fmt(hi)}"
    elif lo is not None:
        text = f"at least {fmt(lo)}"
    elif hi is not None:
        text = f"at most {fmt(hi)}"
    else:
        text = "a finite number"
    return f"{text} (a whole number)" if integer else text


def check_number(name: str, value, lo=None, hi=None, *, integer: bool = False, lo_open: bool = False):
    """Return ``value`` if it is a finite number (an int if ``integer``) in the range, else
    raise InputError naming the setting, the allowed range and the value given. Every
    numeric setting is checked by this one function, from the CLI or from Python."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) if integer else (
        isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value))
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        raise InputError(f"{name} must be {describe_range(lo, hi, integer=integer, lo_open=lo_open)}, "
                         f"got {value!r}")
    return value


def env(name: str, cast=str, default=None):
    """The environment variable ``KNNSTORE_<NAME>`` read as ``cast`` (unset or empty:
    ``default``); a value that does not parse is an InputError naming the variable. Every
    KNNSTORE_* setting is read through this one function."""
    var = f"KNNSTORE_{name.upper()}"
    raw = os.environ.get(var)
    if raw in (None, ""):
        return default
    try:
        return cast(raw)
    except ValueError:
        raise InputError(f"{var}={raw!r} is not a {getattr(cast, '__name__', 'value')}: fix or unset it") from None


def cache_root() -> Path:
    """Where knnstore caches things (``modelcache``): ``KNNSTORE_CACHE``, else
    ``$XDG_CACHE_HOME/knnstore``, else ``~/.cache/knnstore``."""
    given = env("cache", str, None)
    if given:
        return Path(given).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "knnstore"


MAX_KNN_TEMPERATURE = 1e6  # T of p_kNN: far above any squared distance a key has (T beyond it is uniform)
MAX_WINDOW = 1 << 20  # tokens per encoding or scoring window (a model's own limit applies first)
# Scoring (eval, calibrate, explain): every scored token after the first window sees at
# least SCORE_WINDOW - SCORE_STRIDE tokens of context.
SCORE_WINDOW, SCORE_STRIDE = 512, 384


@dataclass(frozen=True)
class IngestSettings:
    """How documents are cut into windows and encoded.

    Each window holds at most ``window`` tokens; consecutive windows of a document start
    ``stride`` tokens apart, and only positions not already seen are kept, so every key
    after the first window saw at least ``window - stride`` tokens of real left context.
    Windows never cross document boundaries.
    """

    window: int = 512
    stride: int = 384
    batch_size: int = 8
    commit_every: int = 65536  # pairs per LanceDB commit; a crash loses at most this much work

    def __post_init__(self) -> None:
        check_number("window", self.window, 2, MAX_WINDOW, integer=True)
        check_number("stride", self.stride, 1, self.window, integer=True)
        check_number("batch_size", self.batch_size, 1, MAX_BATCH_SIZE, integer=True)
        check_number("commit_every", self.commit_every, 1, None, integer=True)

    @classmethod
    def resolve(cls, **given) -> "IngestSettings":
        """Settings from explicit values, then KNNSTORE_* env vars, then defaults."""
        values = {}
        for f in dataclasses.fields(cls):
            value = given.get(f.name)
            values[f.name] = value if value is not None else env(f.name, int, f.default)
        return cls(**values)


@dataclass(frozen=True)
class SourceOptions:
    """How PATH arguments of add-corpus are read into documents."""

    text_field: str = "text"
    split_on_heading: bool = False
    max_documents: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text_field, str) or not self.text_field.strip():
            raise InputError(f"text_field must name a field or column, got {self.text_field!r}")
        if self.max_documents is not None:
            check_number("max_documents", self.max_documents, 1, None, integer=True)


def _flag(raw: str) -> bool:
    return raw.lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Setting:
    """How one kNN setting is given and checked: the one declaration that the CLI's options
    (``cli._knn_options``), the server's request fields (``server.KNNFields``), the
    ``KNNSTORE_*`` environment variable (``KNNSettings.resolve``), the validation
    (``KNNSettings.__post_init__``) and docs/adapter.md's table (``tools/gen_cli_docs.py``) read.

    ``help`` may name ``{default}`` (the field's default) and ``{many}`` (what a list
    does, on ``eval``'s sweepable options)."""

    name: str  # as users write it: the option's --name, the environment variable's suffix, the error's
    help: str
    lo: float | None = None  # range of a number (``check_number``); None: open
    hi: float | None = None
    integer: bool = False
    lo_open: bool = False
    sweep: bool = False  # ``eval`` takes a comma-separated list of values
    request: str | None = None  # the server's request field (None: a server-wide setting only)
    negative: bool = False  # a switch with an --no- form (else a flag that only turns on)
    shown_default: str | None = None  # the default as the docs' table says it, where the field's is not it
    decoding: bool = False  # acts on decoding only (generate, serve): not an option of eval or explain

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def environment(self) -> str:
        return "KNNSTORE_" + self.name.upper()

    def check(self, value) -> None:
        if self.lo is not None or self.hi is not None:
            check_number(self.name, value, self.lo, self.hi, integer=self.integer, lo_open=self.lo_open)


def setting(default, **declared) -> dataclasses.Field:
    """A ``KNNSettings`` field with its ``Setting`` (``settings_of``)."""
    return dataclasses.field(default=default, metadata={"setting": Setting(**declared)})


def settings_of(cls) -> list[tuple[dataclasses.Field, Setting]]:
    """The declared settings of ``cls`` (``KNNSettings``), in their order."""
    return [(f, f.metadata["setting"]) for f in dataclasses.fields(cls) if "setting" in f.metadata]


def value_type(f: dataclasses.Field) -> type:
    """What a declared setting holds: ``bool`` (a switch), ``int`` or ``float``."""
    if f.type in ("bool", bool):
        return bool
    return int if f.metadata["setting"].integer else float


@dataclass(frozen=True)
class KNNSettings:
    """How the adapter mixes the store into the LM (the kNN-LM parameters).

    Attributes:
        k: neighbours per position.
        lambda_: interpolation weight of p_kNN (``--lambda``).
        temperature: T in p_kNN ∝ exp(-d / T), d the squared L2 distance.
        exact: brute-force search instead of the ANN index.
        nprobes, refine_factor: ANN search parameters (IVF partitions probed; candidates
            re-ranked with exact distances, as a multiple of k: 0 ranks by the index's
            estimates; None, the default, does what the index type needs: 0 on IVF-RQ,
            4 on IVF-PQ).
        skip_above_prob, skip_below_entropy: adaptive retrieval; a position skips the
            store when the LM's top probability is at least ``skip_above_prob`` or its
            entropy (nats) at most ``skip_below_entropy``. None: always retrieve (or,
            with ``adaptive``, the policy's own threshold).
        adaptive: a λ per position from the retrieval's confidence (``adaptive.py``): the
            store's calibration (``knnstore calibrate``; the store calibrates itself on its
            own text when it has none or its content has changed since), else a fixed rule.
            ``KNNSettings(...)`` is exactly what it is given (False: the plain kNN-LM);
            ``resolve`` gives the defaults users get, adaptive unless λ is given.
        read: passages of the stored documents a prompt names that the model reads before
            it (``KNNLM.read``; generate and serve only): ``DEFAULT_READ`` from ``resolve``
            when adaptive, else 0.
        follow: pointer following (``following``): a position scores the pairs that follow
            the previous position's neighbours instead of searching, where enough survive.
        draft: drafting (``drafting``; generate only so far): the stored continuation of
            the pairs the text follows (else a repeat in the context) checked by the model in
            one pass; exact for greedy decoding.

    Each field is declared once, with its ``Setting``: a new setting is one field here.
    """

    # Defaults chosen by a sweep with SmolLM2-135M and a WikiText-2 store (docs/performance.md).
    k: int = setting(128, name="k", help="Neighbours per position [default: {default}]{many}.", lo=1, hi=MAX_K,
                     integer=True, sweep=True, request="k")
    lambda_: float = setting(0.15, name="lambda", help="Weight of p_kNN in the mixture [default: {default}]{many}.",
                             lo=0.0, hi=1.0, sweep=True, request="lambda")
    temperature: float = setting(3.0, name="temperature",
                                 help="T in p_kNN ∝ exp(-distance / T) [default: {default}]{many}.",
                                 lo=0.0, hi=MAX_KNN_TEMPERATURE, lo_open=True, sweep=True, request="knn_temperature")
    exact: bool = setting(False, name="exact", shown_default="off",
                          help="Brute-force search over all stored keys instead of the ANN index.",
                          request="exact")
    nprobes: int = setting(32, name="nprobes", help="ANN: index partitions searched [default: {default}].", lo=1,
                           hi=MAX_NPROBES, integer=True)
    refine_factor: int | None = setting(None, name="refine_factor", lo=0, hi=MAX_REFINE_FACTOR, integer=True,
                                        shown_default="by the index: 0 on IVF-RQ, 4 on IVF-PQ, 8 on quantised keys",
                                        help="ANN: candidates re-ranked with exact distances, times k; 0: none "
                                             "[default: 0 on an IVF-RQ index, 4 on IVF-PQ; on quantised keys, "
                                             "candidates ranked by their codes: 8].")
    skip_above_prob: float | None = setting(None, name="skip_above_prob", lo=0.0, hi=1.0, lo_open=True,
                                            shown_default="off",
                                            help="Adaptive retrieval: skip the store where the LM's top probability "
                                                 "is at least this.")
    skip_below_entropy: float | None = setting(None, name="skip_below_entropy", lo=0.0, shown_default="off",
                                               help="Adaptive retrieval: skip the store where the LM's entropy "
                                                    "(nats) is at most this.")
    adaptive: bool = setting(False, name="adaptive", negative=True, request="adaptive",
                             shown_default="on, unless λ is given (`--lambda`, `lambda_=`, `KNNSTORE_LAMBDA`)",
                             help="A λ per token from the retrieval's confidence, and retrieval only where it "
                                  "helps: the store's calibration (`knnstore calibrate`; the store calibrates "
                                  "itself on its own text when it has none). The default unless --lambda is "
                                  "given; --no-adaptive: the plain kNN-LM with a fixed λ.")
    read: int = setting(0, name="read", lo=0, hi=MAX_READ, integer=True, request="read", decoding=True,
                        shown_default=f"{DEFAULT_READ} with the adaptive default; 0 with a λ given",
                        help="Passages of the store's documents the model reads before a prompt (generate, "
                             "serve): those that spell the prompt's rarest phrases, found by the store's own "
                             f"search; 0: none [default: {DEFAULT_READ}, 0 with --lambda].")

    follow: bool = setting(False, name="follow", negative=True, request="follow", shown_default="off",
                           help="Pointer following: a token scores the stored pairs that follow the previous "
                                "token's neighbours in their documents instead of searching, where enough of them "
                                "survive and they are near (eval and explain score as decoding would, and report "
                                "the share). Off by default: on the measured stores it saves 2-35% of the searches "
                                "at up to +1.2% perplexity (docs/performance.md).")
    draft: bool = setting(True, name="draft", negative=True, request="draft", decoding=True, shown_default="on",
                          help="Drafting (generate; the server does not draft yet): the stored continuation of "
                               "the pairs the text follows (else a repeat in the context: passages read, prompt, "
                               "text so far) is checked by the model in one pass and kept as far as the kNN-LM "
                               "agrees (greedy output unchanged; sampling from the same distribution); "
                               "--no-draft: one token per model call.")

    def __post_init__(self) -> None:
        for f, declared in settings_of(type(self)):
            value = getattr(self, f.name)
            if value is not None:
                declared.check(value)

    @classmethod
    def resolve(cls, **given) -> "KNNSettings":
        """Settings from explicit values, then KNNSTORE_K / _LAMBDA / _TEMPERATURE / ...
        environment variables, then defaults. Adaptive interpolation is on unless λ is
        given (a value or KNNSTORE_LAMBDA) without ``adaptive``: a λ asks for the plain
        kNN-LM with that λ, as it always has."""
        values = {}
        for f, declared in settings_of(cls):
            value = given.get(f.name)
            if value is None:
                kind = value_type(f)
                value = env(declared.name, _flag if kind is bool else kind, None)
            if value is None and f.name == "adaptive":
                value = given.get("lambda_") is None and env("lambda", float, None) is None
            if value is None and f.name == "read":
                value = DEFAULT_READ if values["adaptive"] else 0
            values[f.name] = f.default if value is None else value
        return cls(**values)

    def override(self, **given) -> "KNNSettings":
        """These settings with some replaced. A λ given without ``adaptive`` asks for the
        plain kNN-LM with that λ, as in ``resolve``."""
        if "lambda_" in given and "adaptive" not in given:
            given["adaptive"] = False
            given.setdefault("read", 0)
        return dataclasses.replace(self, **given)
