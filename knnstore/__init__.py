"""knnstore: an embedded datastore for kNN language models.

    >>> from knnstore import Store                             # doctest: +SKIP
    >>> store = Store.open("wiki-store")                       # doctest: +SKIP
    >>> [c.name for c in store.corpora()]                      # doctest: +SKIP
    ['wiki']
"""

from .config import IngestSettings, SourceOptions, StoreIdentity
from .encoder import Encoder
from .errors import (
    CorpusExistsError,
    CorpusNotFoundError,
    InputError,
    KnnstoreError,
    ModelLoadError,
    ModelMismatchError,
    ReadOnlyError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    StoreVersionError,
    UnsupportedModelError,
)
from .store import CorpusInfo, Store, StoreStats
from .vectors import Neighbours

__version__ = "0.1.0"

__all__ = [
    "CorpusExistsError", "CorpusInfo", "CorpusNotFoundError", "Encoder", "IngestSettings",
    "InputError", "KnnstoreError", "ModelLoadError", "ModelMismatchError", "Neighbours",
    "ReadOnlyError", "SourceOptions", "Store", "StoreExistsError", "StoreIdentity",
    "StoreLockedError", "StoreNotFoundError", "StoreStats", "StoreVersionError",
    "UnsupportedModelError", "__version__",
]
