"""Builders for LLaVA-OneVision models: plain functions that return modules."""

from torch import nn

from omnilong.models.blocks import RMSNorm, qwen2_decoder_layers
from omnilong.models.llava_onevision.args import LlavaOnevisionTextArgs, SiglipVisionArgs
from omnilong.models.llava_onevision.model import LlavaOnevision, Projector
from omnilong.models.llava_onevision.vision import SiglipVisionTower


def llava_onevision(args: LlavaOnevisionTextArgs, vision_args: SiglipVisionArgs) -> LlavaOnevision:
    """A LLaVA-OneVision model of the given shape (random init; build under
    ``torch.device("meta")`` to allocate nothing)."""
    args.validate()
    layers = qwen2_decoder_layers(
        args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.hidden_dim, args.norm_eps
    )
    model = LlavaOnevision(
        args,
        tok_embeddings=nn.Embedding(args.vocab_size, args.dim),
        layers=layers,
        norm=RMSNorm(args.dim, args.norm_eps),
        output=nn.Linear(args.dim, args.vocab_size, bias=False),
        visual=SiglipVisionTower(vision_args, args.vision_feature_layer),
        projector=Projector(vision_args.dim, args.dim),
    )
    model.reset_parameters()
    return model


def llava_onevision_7b() -> LlavaOnevision:
    """llava-onevision-qwen2-7b-ov-hf: Qwen2-7B decoder (28 layers, dim 3584, 28 query / 4
    key-value heads, SwiGLU 18944, vocab 152128, rope_theta 1e6), SigLIP so400m tower with 26
    layers kept (dim 1152, 16 heads, MLP 4304, 384 px, patch 14), projector 1152 -> 3584 -> 3584."""
    return llava_onevision(LlavaOnevisionTextArgs(), SiglipVisionArgs())
