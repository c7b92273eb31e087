"""Reduced keys: a PCA projection of the model's keys, fitted once per store.

A store made with ``init --key-dim D`` keeps D-dimensional keys instead of the model's
``dim``: ``(key - mean) @ components`` with ``components`` the D leading principal axes of
a sample of the store's own keys (the first corpus's: ``FIT_KEYS`` of them). The same map
is applied to every key stored later and to every query, so distances are squared L2 in
the reduced space, and the exact reference search is exact over what is stored.

A store can also keep its reduced keys **quantised** (``--key-bits 4`` or 8): every
dimension of the projected key as a ``bits``-bit code on a per-dimension uniform grid
(``lo + code * step``, the grid spanning the fit sample's 0.1%..99.9% quantiles), packed
into ``code_bytes`` bytes; beside them the table keeps the first ``route_dim`` projected
dimensions (the leading principal axes) as a small float key that LanceDB indexes and
routes queries with. Distances, and so p_kNN, are over the decoded codes: a search takes
candidates by the routing key and ranks them by the codes, and the exact reference
search is a brute-force scan over the decoded codes: exact over what is stored.

The projection lives in the catalog (``store_config.key_projection``, the bytes below)
with its sha256, which is also the table's ``knnstore.key_projection`` config entry: a
table and a catalog whose projections differ are refused on open. Measured on the
WikiText-2 store (docs/compact.md): 256 dimensions of SmolLM2's 576 cost +0.57%
perplexity, 128 cost +0.98%.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import sys
from dataclasses import dataclass

import numpy as np

from .errors import InputError, StoreDamagedError

FIT_KEYS = 32768  # keys of the first corpus a projection is fitted on (at most)
KEY_BITS = (4, 8)  # bits per dimension a quantised key may have
CLIP_QUANTILE = 0.001  # each dimension's grid spans its fit sample's [q, 1 - q] quantiles
DEFAULT_ROUTE_DIM = 64  # routing key dimensions unless chosen (at most about half the key)


@dataclass(frozen=True, eq=False)
class KeyProjection:
    """x -> (x - mean) @ components: [.., dim] -> [.., key_dim] (float32); and, for a
    quantised store, those keys <-> (routing key, codes) (``encode`` / ``decode``)."""

    mean: np.ndarray  # [dim] float32
    components: np.ndarray  # [dim, key_dim] float32, orthonormal columns
    bits: int | None = None  # quantised keys: bits per dimension (None: float keys)
    route_dim: int | None = None  # quantised keys: the routing key's dimensions
    lo: np.ndarray | None = None  # [key_dim] float32: each dimension's code 0
    step: np.ndarray | None = None  # [key_dim] float32: each dimension's code step

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def key_dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def quantised(self) -> bool:
        return self.bits is not None

    @property
    def code_bytes(self) -> int:
        """Bytes of one key's codes (0: float keys)."""
        return 0 if self.bits is None else self.key_dim * self.bits // 8

    @property
    def stored_dim(self) -> int:
        """The dimension of the table's float key column: the routing key's, or the key's."""
        return self.route_dim if self.route_dim is not None else self.key_dim

    @staticmethod
    def check_quantisation(key_dim: int, bits: int | None, route_dim: int | None) -> int | None:
        """The routing dimension a quantised key of ``key_dim`` dimensions gets (``route_dim``
        or the default), after checking the three fit together; None for float keys."""
        if bits is None:
            if route_dim is not None:
                raise InputError("--route-dim is for quantised keys: give --key-bits too")
            return None
        if bits not in KEY_BITS:
            raise InputError(f"--key-bits must be one of {', '.join(map(str, KEY_BITS))}, got {bits}")
        if key_dim * bits % 8:
            raise InputError(f"{key_dim} dimensions of {bits} bits do not fill whole bytes: choose an even --key-dim")
        if route_dim is None:  # a multiple of 8, about half the key, at most DEFAULT_ROUTE_DIM
            return min(key_dim, DEFAULT_ROUTE_DIM, max(8, key_dim // 2 // 8 * 8))
        if not 1 <= route_dim <= key_dim or route_dim % 8:
            raise InputError(f"--route-dim must be a multiple of 8 (the index's RaBitQ codes need it) and at most "
                             f"--key-dim ({key_dim}), got {route_dim}")
        return route_dim

    @classmethod
    def fit(cls, keys: np.ndarray, key_dim: int, bits: int | None = None,
            route_dim: int | None = None) -> "KeyProjection":
        """The ``key_dim`` leading principal axes of ``keys`` [n, dim] (float64 maths); with
        ``bits``, the per-dimension grid of the projected keys and a ``route_dim``-dimensional
        routing key (``check_quantisation``)."""
        keys = np.asarray(keys, dtype=np.float64)
        n, dim = keys.shape
        if not 1 <= key_dim <= dim:
            raise InputError(f"key_dim must be at least 1 and at most the model's key dimension {dim}, got {key_dim}")
        route_dim = cls.check_quantisation(key_dim, bits, route_dim)
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
        projection = cls(mean.astype(np.float32), np.ascontiguousarray(components, dtype=np.float32))
        return projection if bits is None else projection.with_grid(projection.apply(keys), bits, route_dim)

    def with_grid(self, projected: np.ndarray, bits: int, route_dim: int) -> "KeyProjection":
        """This projection, quantising its keys on a grid fitted to ``projected`` [n, key_dim]."""
        lo, hi = np.quantile(np.asarray(projected, dtype=np.float64), [CLIP_QUANTILE, 1 - CLIP_QUANTILE], axis=0)
        step = np.maximum(hi - lo, 1e-12) / (2**bits - 1)
        return dataclasses.replace(self, bits=bits, route_dim=route_dim, lo=lo.astype(np.float32),
                                   step=step.astype(np.float32))

    def encode(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Projected keys [n, key_dim] -> (routing keys [n, route_dim] float32, codes
        [n, code_bytes] uint8; 4-bit codes two to a byte, the even dimension high)."""
        keys = np.asarray(keys, dtype=np.float32)
        levels = 2**self.bits - 1
        codes = np.clip(np.rint((keys - self.lo) / self.step), 0, levels).astype(np.uint8)
        if self.bits == 4:
            codes = (codes[:, 0::2] << 4) | codes[:, 1::2]
        return np.ascontiguousarray(keys[:, :self.route_dim]), np.ascontiguousarray(codes)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes [n, code_bytes] uint8 -> the keys they stand for [n, key_dim] float32."""
        codes = np.asarray(codes, dtype=np.uint8).reshape(-1, self.code_bytes)
        if self.bits == 4:
            codes = np.stack([codes >> 4, codes & 15], axis=2).reshape(len(codes), self.key_dim)
        return codes.astype(np.float32) * self.step + self.lo

    def code_distances(self, codes: np.ndarray, queries: np.ndarray, which: np.ndarray,
                       block: int = 4096) -> np.ndarray:
        """Squared L2 from the key each row of ``codes`` [n, code_bytes] stands for to its
        query ``queries[which[i]]`` ([Q, key_dim] projected): float32 [n]. In code units,
        sum_d step_d^2 (u_d - c_d)^2 with u = (q - lo) / step, a block of rows at a time (the
        block's decoded codes stay in cache: ~7x faster than decoding all, then subtracting)."""
        import torch

        codes_t = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1, self.code_bytes))
        u = torch.from_numpy((np.asarray(queries, dtype=np.float32) - self.lo) / self.step)
        w = torch.from_numpy(self.step * self.step)
        which_t = torch.from_numpy(np.asarray(which, dtype=np.int64))
        out = torch.empty(len(codes_t), dtype=torch.float32)
        for lo in range(0, len(codes_t), block):  # (tensors made from numpy: no autograd graph)
            c = codes_t[lo:lo + block]
            if self.bits == 4:
                c = torch.stack([c >> 4, c & 15], dim=2).reshape(len(c), self.key_dim)
            diff = c.float().sub_(u[which_t[lo:lo + block]])
            out[lo:lo + block] = diff.mul_(diff) @ w
        return out.numpy()

    def apply(self, keys):
        """Project keys [..., dim] (numpy or torch; float32 out, on the input's device)."""
        torch = sys.modules.get("torch")  # a tensor means torch is loaded; numpy keys need no torch
        if torch is not None and isinstance(keys, torch.Tensor):
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
        return dataclasses.replace(self, mean=mean.astype(np.float32),
                                   components=np.ascontiguousarray(components, dtype=np.float32))

    def to_bytes(self) -> bytes:
        """mean, components, then (quantised) lo, step, [bits, route_dim]: .npy arrays in a row."""
        buf = io.BytesIO()
        arrays = [self.mean, self.components]
        if self.bits is not None:
            arrays += [self.lo, self.step, np.array([self.bits, self.route_dim], dtype=np.int64)]
        for array in arrays:
            np.save(buf, array, allow_pickle=False)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "KeyProjection":
        try:
            buf = io.BytesIO(data)
            mean = np.load(buf, allow_pickle=False)
            components = np.load(buf, allow_pickle=False)
            if buf.tell() == len(data):
                return cls(mean, components)
            lo, step = np.load(buf, allow_pickle=False), np.load(buf, allow_pickle=False)
            bits, route_dim = (int(v) for v in np.load(buf, allow_pickle=False))
        except (ValueError, OSError, EOFError) as exc:
            raise StoreDamagedError(f"the store's key projection cannot be read ({exc}): restore the "
                                    "catalog from a backup") from None
        return cls(mean, components, bits, route_dim, lo, step)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def describe(self) -> str:
        codes = "" if self.bits is None else f", {self.bits}-bit codes, routing key {self.route_dim} dims"
        return f"PCA {self.dim} -> {self.key_dim}{codes} (sha256 {self.sha256[:12]})"
