"""knnstore: an embedded datastore for kNN language models.

    >>> from knnstore import Store                             # doctest: +SKIP
    >>> store = Store.open("wiki-store")                       # doctest: +SKIP
    >>> [c.name for c in store.corpora()]                      # doctest: +SKIP
    ['wiki']
"""

from .config import IngestSettings, KNNSettings, SourceOptions, StoreIdentity
from .errors import (
    CorpusExistsError,
    CorpusNotFoundError,
    DiskFullError,
    CatalogError,
    InputError,
    KnnstoreError,
    ModelLoadError,
    ModelMismatchError,
    ModelRunError,
    ReadOnlyError,
    StoreDamagedError,
    StoreExistsError,
    StoreLockedError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreVersionError,
    UnsupportedModelError,
)
from .indexing import IndexPlan

try:  # one version, pyproject.toml's
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("knnstore")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# Loaded on first use: the store (LanceDB), the encoder (torch) and the adapter
# (transformers' generation utilities) are slow to import, and `knnstore list` needs none
# of torch and transformers.
_LAZY = {"Store": "store", "Encoder": "encoder", "CorpusInfo": "results", "DocumentRef": "results",
         "StoreStats": "results", "IndexState": "index_kinds", "Neighbours": "vectors",
         "KNNLM": "adapter", "KNNLogitsProcessor": "adapter", "Generation": "adapter",
         "Source": "adapter", "Span": "adapter", "TokenExplanation": "adapter", "EvalResult": "evaluate",
         # the Python twins of `knnstore calibrate` and `check` (`eval`: KNNLM.evaluate;
         # `check`: Store.check; the functions `evaluate` and `check` share their modules' names)
         "calibrate": "evaluate", "CheckReport": "check"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'knnstore' has no attribute {name!r}")


__all__ = [
    "CatalogError", "CheckReport", "CorpusExistsError", "calibrate", "CorpusInfo", "DocumentRef", "EvalResult", "Generation", "KNNLM", "KNNLogitsProcessor",
    "KNNSettings", "Source", "Span", "TokenExplanation", "CorpusNotFoundError", "DiskFullError", "Encoder", "IngestSettings",
    "IndexPlan", "IndexState", "InputError", "KnnstoreError", "ModelLoadError", "ModelMismatchError", "ModelRunError", "Neighbours",
    "ReadOnlyError", "SourceOptions", "Store", "StoreDamagedError", "StoreExistsError", "StoreIdentity",
    "StoreLockedError", "StoreMismatchError", "StoreNotFoundError", "StoreStats", "StoreVersionError",
    "UnsupportedModelError", "__version__",
]
