"""Key capture: the right site, any common architecture, padding-proof."""

import pytest
import torch

from knnstore import Encoder, ModelLoadError, UnsupportedModelError
from knnstore.encoder import find_layers, find_mlp

from .conftest import make_tiny_model


def test_ffn_input_key_is_the_output_of_the_post_attention_norm(tiny_encoder):
    layer = find_layers(tiny_encoder.model)[-1]
    seen = []
    handle = layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
        keys, logits = tiny_encoder.forward(ids, with_logits=True)
    finally:
        handle.remove()
    assert keys.shape == (1, 6, 32) and logits.shape[:2] == (1, 6)
    torch.testing.assert_close(keys, seen[0])


def test_keys_only_path_equals_full_forward_and_leaves_no_hook(tiny_encoder):
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    full, _ = tiny_encoder.forward(ids, with_logits=True)
    fast, none = tiny_encoder.forward(ids)
    assert none is None
    torch.testing.assert_close(full, fast)
    # No hook is left: the model's own forward runs to the end, and the key site sees
    # exactly one pre-hook call, ours.
    mlp = find_mlp(find_layers(tiny_encoder.model)[-1])
    calls = []
    handle = mlp.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        out = tiny_encoder.model(ids).logits
    finally:
        handle.remove()
    assert out.shape[:2] == (1, 6) and calls == [1]


def test_right_padding_does_not_change_the_keys_of_real_tokens(tiny_encoder):
    short = torch.tensor([[7, 8, 9]])
    padded = torch.tensor([[7, 8, 9, 0, 0], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    alone, _ = tiny_encoder.forward(short)
    batched, _ = tiny_encoder.forward(padded, mask)
    torch.testing.assert_close(batched[0, :3], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_other_architectures_are_placed(tmp_path, arch):
    enc = Encoder.load(str(make_tiny_model(tmp_path / arch, arch=arch)), key_layer=0)
    keys, _ = enc.forward(torch.tensor([[1, 2, 3, 4]]))
    assert keys.shape == (1, 4, 32) and enc.key_layer == 0


def test_layer_output_site_and_earlier_layers(tiny_encoder):
    enc = Encoder(tiny_encoder.model, tiny_encoder.tokenizer, "tiny", key_layer=0, key_site="layer_output")
    ids = torch.tensor([[4, 5, 6]])
    keys, _ = enc.forward(ids)
    hidden = tiny_encoder.model(ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(keys, hidden)


def test_a_model_without_decoder_layers_is_refused_clearly(tiny_encoder):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(UnsupportedModelError, match="cannot find the decoder layers of Sequential"):
        find_layers(model)


def test_a_key_layer_out_of_range_is_refused(tiny_encoder):
    with pytest.raises(ValueError, match="key_layer 5 is out of range: the model has 2 layers"):
        Encoder(tiny_encoder.model, tiny_encoder.tokenizer, "tiny", key_layer=5)


def test_an_unknown_model_gives_a_one_line_error(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load model") as info:
        Encoder.load(str(tmp_path / "no-model-here"))
    assert "\n" not in str(info.value)


def test_fingerprints_tell_models_apart(tmp_path, tiny_encoder):
    other = Encoder.load(str(make_tiny_model(tmp_path / "other", seed=1)))
    a, b = tiny_encoder.identity("float16"), other.identity("float16")
    assert a.tokenizer_fingerprint == b.tokenizer_fingerprint
    assert a.model_fingerprint != b.model_fingerprint
    assert a.differences(b) and not a.differences(a)
