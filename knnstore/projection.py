"""Reduced keys: a PCA projection of the model's keys, fitted once per store.

A store made with ``init --key-dim D`` keeps D-dimensional keys instead of the model's
``dim``: ``(key - mean) @ components`` with ``components`` the D leading principal axes of
a sample of the store's own keys (the first corpus's: ``FIT_KEYS`` of them). The same map
is applied to every key stored later and to every query, so distances are squared L2 in
the reduced space, and the exact reference search is exact over what is stored.

The projection lives in the catalog (``store_config.key_projection``, the bytes below)
with its sha256, which is also the table's ``knnstore.key_projection`` config entry: a
table and a catalog whose projections differ are refused on open. Measured on the
WikiText-2 store (docs/compact.md): 256 dimensions of SmolLM2's 576 cost +0.57%
perplexity, 128 cost +0.98%.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError, StoreDamagedError

FIT_KEYS = 32768  # keys of the first corpus a projection is fitted on (at most)


@dataclass(frozen=True, eq=False)
class KeyProjection:
    """x -> (x - mean) @ components: [.., dim] -> [.., key_dim] (float32)."""

    mean: np.ndarray  # [dim] float32
    components: np.ndarray  # [dim, key_dim] float32, orthonormal columns

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def key_dim(self) -> int:
        return int(self.components.shape[1])

    @classmethod
    def fit(cls, keys: np.ndarray, key_dim: int) -> "KeyProjection":
        """The ``key_dim`` leading principal axes of ``keys`` [n, dim] (float64 maths)."""
        keys = np.asarray(keys, dtype=np.float64)
        n, dim = keys.shape
        if not 1 <= key_dim <= dim:
            raise InputError(f"key_dim must be at least 1 and at most the model's key dimension {dim}, got {key_dim}")
        if n <= key_dim:
            raise InputError(f"fitting {key_dim} key dimensions needs more than {key_dim} keys, got {n}: add a "
                             "larger first corpus, or choose a smaller --key-dim")
        mean = keys.mean(axis=0)
        centred = keys - mean
        values, vectors = np.linalg.eigh(centred.T @ centred / (n - 1))
        order = np.argsort(values)[::-1][:key_dim]
        components = vectors[:, order]
        # a deterministic sign per axis (eigh's is arbitrary): largest entry positive
        signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(key_dim)])
        components = components * np.where(signs == 0, 1, signs)
        return cls(mean.astype(np.float32), np.ascontiguousarray(components, dtype=np.float32))

    def apply(self, keys):
        """Project keys [..., dim] (numpy or torch; float32 out, on the input's device)."""
        if isinstance(keys, torch.Tensor):
            mean = torch.from_numpy(self.mean).to(keys.device)
            comp = torch.from_numpy(self.components).to(keys.device)
            return (keys.float() - mean) @ comp
        return (np.asarray(keys, dtype=np.float32) - self.mean) @ self.components

    def after(self, first: "KeyProjection") -> "KeyProjection":
        """The projection that applies ``first``, then this one (a store reduced again):
        (x - m1) C1 then (y - m2) C2 is (x - m) C1 C2 with m = m1 + m2 C1^T, since C1's
        columns are orthonormal."""
        mean = first.mean.astype(np.float64) + self.mean.astype(np.float64) @ first.components.T.astype(np.float64)
        components = first.components.astype(np.float64) @ self.components.astype(np.float64)
        return KeyProjection(mean.astype(np.float32), np.ascontiguousarray(components, dtype=np.float32))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.save(buf, self.mean, allow_pickle=False)
        np.save(buf, self.components, allow_pickle=False)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "KeyProjection":
        try:
            buf = io.BytesIO(data)
            mean = np.load(buf, allow_pickle=False)
            components = np.load(buf, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise StoreDamagedError(f"the store's key projection cannot be read ({exc}): restore the "
                                    "catalog from a backup") from None
        return cls(mean, components)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def describe(self) -> str:
        return f"PCA {self.dim} -> {self.key_dim} (sha256 {self.sha256[:12]})"
