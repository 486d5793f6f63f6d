"""Native Qwen2.5-VL language model vs transformers' Qwen2_5_VLForConditionalGeneration.

Oracle: transformers' implementation loaded from the same tiny random checkpoint,
fp32 on CPU; tolerance: max abs diff <= 1e-5 for logits and gradients.
"""

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from omnilong.hf_io import read_hf_config
from omnilong.models import load_hf_model, qwen2_5_vl_7b
from omnilong.models.qwen2_5_vl import text_args_from_hf_config
from omnilong.models.qwen2_5_vl._convert_weights import native_to_hf

ATOL = 1e-5


def _hf_model(path):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")


def _hf_param(hf_model, hub_key):
    """Parameter of the transformers model by its hub checkpoint name."""
    in_memory = hub_key.replace("model.", "model.language_model.", 1) if hub_key.startswith("model.") else hub_key
    return dict(hf_model.named_parameters())[in_memory]


def _tokens(vocab, shape, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_config_layouts_give_the_same_args(tiny_qwen_dir, tiny_qwen_flat_dir, layout):
    nested = text_args_from_hf_config(read_hf_config(tiny_qwen_dir))
    path = tiny_qwen_dir if layout == "nested" else tiny_qwen_flat_dir
    args = text_args_from_hf_config(read_hf_config(path))
    assert args == nested
    assert args.mrope_section == [2, 3, 3] and args.n_kv_heads == 2


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_text_logits_match_transformers(tiny_qwen_dir, tiny_qwen_flat_dir, layout):
    path = tiny_qwen_dir if layout == "nested" else tiny_qwen_flat_dir
    hf, native = _hf_model(path).eval(), load_hf_model(path).eval()
    input_ids = _tokens(native.args.vocab_size, (2, 37))
    with torch.no_grad():
        expected = hf(input_ids=input_ids).logits
        actual = native(input_ids=input_ids)
    assert actual.shape == (2, 37, native.args.vocab_size)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_gradients_match_transformers(tiny_qwen_dir):
    hf, native = _hf_model(tiny_qwen_dir), load_hf_model(tiny_qwen_dir)
    input_ids = _tokens(native.args.vocab_size, (2, 29), seed=1)
    labels = _tokens(native.args.vocab_size, (2, 29), seed=2)

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    loss(hf(input_ids=input_ids).logits).backward()
    loss(native(input_ids=input_ids)).backward()
    native_params = dict(native.named_parameters())
    for native_key in [
        "tok_embeddings.weight",
        "layers.0.attention.wq.weight",
        "layers.0.attention.wk.bias",
        "layers.1.attention.wo.weight",
        "layers.1.feed_forward.w1.weight",
        "layers.0.attention_norm.weight",
        "norm.weight",
        "output.weight",
    ]:
        (hub_key,) = native_to_hf({native_key: None})
        hf_grad = _hf_param(hf, hub_key).grad
        torch.testing.assert_close(native_params[native_key].grad, hf_grad, atol=ATOL, rtol=0, msg=native_key)


def test_left_padded_batch_matches_transformers(tiny_qwen_dir):
    """Padding tokens (attention_mask 0) are invisible to real tokens, positions skip them."""
    hf, native = _hf_model(tiny_qwen_dir).eval(), load_hf_model(tiny_qwen_dir).eval()
    input_ids = _tokens(native.args.vocab_size, (2, 20), seed=3)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :7] = 0
    with torch.no_grad():
        expected = hf(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = native(input_ids=input_ids, attention_mask=attention_mask)
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=ATOL, rtol=0)


def test_packed_documents_do_not_see_each_other(tiny_qwen_dir):
    """A packed row with document ids and per-document positions gives each document the
    logits it has alone."""
    native = load_hf_model(tiny_qwen_dir).eval()
    a, b = _tokens(native.args.vocab_size, (1, 11), seed=4), _tokens(native.args.vocab_size, (1, 6), seed=5)
    packed = torch.cat([a, b], dim=1)
    document_ids = torch.tensor([[0] * 11 + [1] * 6])
    position_ids = torch.tensor([list(range(11)) + list(range(6))])
    with torch.no_grad():
        out = native(input_ids=packed, position_ids=position_ids, document_ids=document_ids)
        torch.testing.assert_close(out[:, :11], native(input_ids=a), atol=ATOL, rtol=0)
        torch.testing.assert_close(out[:, 11:], native(input_ids=b), atol=ATOL, rtol=0)


def test_7b_parameter_counts_equal_transformers():
    """Checked on the meta device with the published Qwen2.5-VL-7B-Instruct shape: the whole
    model, and the language model alone."""
    with torch.device("meta"):
        native = qwen2_5_vl_7b()
        hf = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(
                text_config=dict(
                    vocab_size=152064,
                    hidden_size=3584,
                    intermediate_size=18944,
                    num_hidden_layers=28,
                    num_attention_heads=28,
                    num_key_value_heads=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                ),
                vision_config=dict(
                    depth=32,
                    hidden_size=1280,
                    intermediate_size=3420,
                    num_heads=16,
                    out_hidden_size=3584,
                    fullatt_block_indexes=[7, 15, 23, 31],
                    window_size=112,
                    tokens_per_second=2,
                ),
            )
        )
    hf_lm = sum(p.numel() for n, p in hf.named_parameters() if "visual" not in n)
    native_lm = sum(p.numel() for n, p in native.named_parameters() if not n.startswith("visual."))
    assert native_lm == hf_lm == 7_615_616_512
    assert sum(p.numel() for p in native.parameters()) == sum(p.numel() for p in hf.parameters()) == 8_292_166_656
