"""A cache of dequantised GGUF models, so that only the first load pays for dequantising.

Loading SmolLM2's GGUF file through transformers dequantises every tensor in Python (~15 s
on 2 CPUs); the same float32 weights saved as safetensors load in about a second. The
first load of a GGUF model writes, beside the user's other caches, a directory keyed by
the GGUF file's sha256::

    $KNNSTORE_CACHE  (else $XDG_CACHE_HOME/knnstore, else ~/.cache/knnstore)
      models/<sha256 of the GGUF file>/
        config.json, model.safetensors, tokenizer files   (save_pretrained)
        manifest.json                                     (written last)

``manifest.json`` names every file with its size and sha256. The directory is written under
a temporary name and renamed into place whole, so a load never sees half of one; a cached
model is used only when every file the manifest names is there with its size and sha256
(checked while the model is read, and what was read dropped if the check fails)
(a damaged or truncated file is found, the directory removed and the model rebuilt from the
GGUF file). The weights are the GGUF file's own, dequantised once: a store's model
fingerprint is the same either way. A cache that cannot be written (a read-only home, a
full disk, a model transformers cannot save) costs only the speed-up: the model loads from
the GGUF file, with a warning.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CACHE_FORMAT = 1  # bump when what is cached changes meaning


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_dir(gguf: Path, root: Path) -> Path:
    """The cache directory under ``root`` (``config.cache_root``) of the model in the GGUF
    file ``gguf`` (keyed by its sha256)."""
    return root / "models" / file_sha256(gguf)


def _manifest(directory: Path) -> dict | None:
    """The directory's manifest when it is readable, of this format, and every file it
    names is there with its size (the cheap half of ``is_complete``); else None."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest.get("format") != CACHE_FORMAT:
            return None
        for name, want in manifest["files"].items():
            if (directory / name).stat().st_size != want["size"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _hashes_match(directory: Path, manifest: dict) -> bool:
    try:
        return all(file_sha256(directory / name) == want["sha256"] for name, want in manifest["files"].items())
    except (OSError, KeyError, TypeError):
        return False


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds every file its manifest names, each of its size and
    sha256 (False for a directory without a readable manifest)."""
    manifest = _manifest(directory)
    return manifest is not None and _hashes_match(directory, manifest)


def load_verified(directory: Path, load_dir: Callable[[Path], tuple]) -> tuple | None:
    """The cached model of ``directory`` (``load_dir``) if it is complete (``is_complete``),
    else None. The files' sha256 are checked on another thread while ``load_dir`` runs
    (hashing releases the GIL; loading is mostly imports that hold it), so the check adds
    little wall time; what was read is dropped unless the check passes."""
    from concurrent.futures import ThreadPoolExecutor

    manifest = _manifest(directory)
    if manifest is None:
        return None
    with ThreadPoolExecutor(1, thread_name_prefix="knnstore-modelcache") as pool:
        hashes = pool.submit(_hashes_match, directory, manifest)
        try:
            loaded = load_dir(directory)
        except Exception:
            if hashes.result():
                raise  # the files are whole: the failure is not the cache's
            return None
        return loaded if hashes.result() else None


def load_cached(gguf: Path, load_gguf: Callable[[], tuple], load_dir: Callable[[Path], tuple],
                root: Path) -> tuple:
    """(model, tokenizer) of the GGUF file ``gguf``: from its cache directory under ``root``
    when a complete one exists (``load_verified``), else from the file (``load_gguf``), then
    cached for next time."""
    directory = model_dir(gguf, root)
    if directory.exists():
        loaded = load_verified(directory, load_dir)
        if loaded is not None:
            return loaded
        log.warning("the cached model at %s is damaged or incomplete: rebuilding it from %s", directory, gguf)
        shutil.rmtree(directory, ignore_errors=True)
    model, tokenizer = load_gguf()
    try:
        write_cache(directory, model, tokenizer, gguf)
    except Exception as exc:  # (OSError mostly) the cache is a speed-up: never a reason a load fails
        log.warning("could not cache the dequantised model in %s (%s): the next load will dequantise "
                    "%s again; set KNNSTORE_CACHE to a writable directory", directory.parent, exc, gguf.name)
    return model, tokenizer


def write_cache(directory: Path, model, tokenizer, gguf: Path) -> None:
    """Save ``model`` and ``tokenizer`` as ``directory``: written under a temporary name,
    the manifest last, then renamed into place (a crash leaves no directory a load uses)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".tmp-{directory.name[:16]}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        save_float_model(model, tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format": CACHE_FORMAT, "source": gguf.name, "source_sha256": directory.name, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(tmp, directory)
        except OSError:
            if not is_complete(directory):  # another process cached it first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_float_model(model, directory: Path) -> None:
    """``model``'s weights as they are (float32, tied ones once) and its config without the
    GGUF quantisation record: transformers refuses ``save_pretrained`` on a model loaded from
    GGUF ("quantized with gguf and is not serializable"), though its weights are plain floats."""
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
