"""Per-GPU peak memory of a training step, predicted from the model's shape and the run's
switches, and the longest sequence that fits.

What is modelled (bytes per GPU; ``T`` = tokens per GPU = batch x seq_len / cp, ``D`` model
width, ``F`` MLP width, ``K`` key/value width, ``c`` compute-dtype bytes, ``S`` ranks a
parameter is sharded over = gpus / dp_replicate):

* parameters: the fp32 shards (``4 P / S``; on the host with ``fsdp_cpu_offload``), the root
  module unsharded in the compute dtype (embeddings, output, final norm: FSDP2 keeps the root
  gathered from forward to backward);
* gradients: the fp32 shards of the trained parameters (``4 P_trained / S``; host with offload),
  the output weight's fp32 gradient of the chunked loss (plus its copy in the compute dtype);
* optimizer state: AdamW's two fp32 moments of the trained shards (host with offload);
* saved activations: each checkpointed layer's input (``T D c``), with ``activation_offload``
  two of them (the one being copied out, the one brought back ahead); the final norm's saved
  tensors, the loss's hidden-state gradient, the rope tables and ids shared by all layers;
* one layer's recompute: what a decoder layer saves for its backward (norms, q/k/v, attention
  output, the MLP's four ``[T, F]`` intermediates) plus the backward's transient gradients;
  with ``mlp_chunk_size`` the MLP part is one chunk's;
* loss chunk: one chunk of fp32 logits (and its gradient in the compute dtype);
* communication buffers: FSDP2's all-gather of two layers (current + prefetched, compute
  dtype) and one layer's fp32 reduce-scatter input; ring attention's key/value blocks in
  flight and their fp32 gradient accumulators.

The peak is the persistent part plus the largest of three moments: the end of the forward
(all saved activations and one loss chunk), the backward of the last layer (saved
activations, one recompute, the flowing gradients), the end of the backward (all gradients).
Not modelled: the vision tower's activations (video inputs: plan them separately), the CUDA
context, NCCL's own buffers and allocator fragmentation (keep a reserve), pinned host memory.
"""

import math
from dataclasses import dataclass, replace

from torch import nn

from omnilong.loss.chunked_linear_ce import auto_chunk_size

GiB = 2**30
RESERVE_GIB = 6.0  # CUDA context, NCCL buffers, cuBLAS workspaces, allocator fragmentation


@dataclass(frozen=True)
class GPU:
    """A GPU a run is planned for: its memory and its dense bf16 peak throughput."""

    name: str
    memory_gib: float
    bf16_tflops: float

    @property
    def usable_bytes(self) -> int:
        """What a training step may take: the memory less :data:`RESERVE_GIB`."""
        return int((self.memory_gib - RESERVE_GIB) * GiB)


#: ``--gpu`` names: memory as ``torch.cuda.get_device_properties`` reports it (nvidia-smi's
#: MiB), peak dense bf16 throughput from the vendor's data sheet (SXM parts).
GPUS = {
    "h100": GPU("H100 80 GB", 79.6, 989.0),
    "h200": GPU("H200 141 GB", 139.8, 989.0),
    "a100": GPU("A100 80 GB", 79.2, 312.0),
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes the planner needs, read off a model (built on the meta device)."""

    n_layers: int
    dim: int
    kv_dim: int  # key/value width: n_kv_heads * head_dim
    hidden_dim: int  # MLP width
    n_heads: int
    head_dim: int
    vocab_size: int
    layer_params: int  # one decoder layer
    root_params: int  # embeddings, final norm, output and the vision tower's unwrapped parts
    other_params: int  # the vision tower's blocks
    trained_params: int

    @classmethod
    def of(cls, model: nn.Module, freeze_vision: bool = True) -> "ModelShape":
        """The shape of ``model`` (a native model with ``args``, ``layers`` and maybe ``visual``)."""
        args = model.args
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        total = count(model)
        layers = count(model.layers)
        blocks = count(model.visual.layers) if model.visual is not None else 0
        vision = count(model.visual) if model.visual is not None else 0
        return cls(
            n_layers=args.n_layers,
            dim=args.dim,
            kv_dim=args.n_kv_heads * args.head_dim,
            hidden_dim=args.hidden_dim,
            n_heads=args.n_heads,
            head_dim=args.head_dim,
            vocab_size=args.vocab_size,
            layer_params=layers // args.n_layers,
            root_params=total - layers - blocks,
            other_params=blocks,
            trained_params=total - (vision if freeze_vision else 0),
        )

    @property
    def params(self) -> int:
        return self.n_layers * self.layer_params + self.root_params + self.other_params


@dataclass(frozen=True)
class RunSetup:
    """The switches of a run that decide its memory (config keys of the same names)."""

    seq_len: int
    gpus: int = 1
    cp: int = 1
    dp_replicate: int = 1
    batch_size: int = 1
    compute_bytes: int = 2  # bf16; 4: fp32
    fsdp: bool = True  # False: a plain model (the CPU validation)
    fsdp_cpu_offload: bool = False
    activation_checkpointing: bool = True
    activation_offload: bool = False
    mlp_chunk_size: int | None = None
    loss_chunk_size: int | None = None  # None: omnilong.loss's automatic chunk

    @classmethod
    def from_config(cls, cfg, gpus: int) -> "RunSetup":
        """The switches of a (validated) recipe config on ``gpus`` GPUs."""
        loss_chunk = cfg.loss.get("chunk_size") if cfg.get("loss") is not None else None
        return cls(
            seq_len=cfg.max_seq_len,
            gpus=gpus,
            cp=cfg.cp_degree,
            dp_replicate=cfg.dp_replicate_degree,
            batch_size=cfg.batch_size,
            compute_bytes=2 if cfg.dtype == "bf16" else 4,
            fsdp_cpu_offload=cfg.fsdp_cpu_offload,
            activation_checkpointing=cfg.enable_activation_checkpointing,
            activation_offload=cfg.activation_offload,
            mlp_chunk_size=cfg.mlp_chunk_size,
            loss_chunk_size=loss_chunk,
        )

    def validate(self) -> None:
        if self.gpus % (self.dp_replicate * self.cp):
            raise ValueError(
                f"gpus {self.gpus} must be a multiple of dp_replicate * cp = {self.dp_replicate * self.cp}"
            )


def _norm_saved(c: int, dim: int) -> int:
    """Bytes per token an RMSNorm saves beyond its input: the fp32 copy of the input (none
    when the input is fp32 already), the normalised and the weighted output (dtype ``c``)."""
    return (4 * dim if c != 4 else 0) + 2 * c * dim


def layer_saved_per_token(shape: ModelShape, c: int) -> tuple[int, int]:
    """Bytes per token a decoder layer saves for its backward: ``(attention part, MLP part)``.

    Attention part: the attention norm, q after rope (``D``), k and v (``K`` each), the
    attention output and its head-merged copy (``D`` each), the residual ``h`` (``D``), the
    softmax log-sum-exp (fp32 per head). MLP part: the MLP norm and the gate, SiLU, up and
    product tensors (``F`` each).
    """
    d, k, f = shape.dim, shape.kv_dim, shape.hidden_dim
    attention = _norm_saved(c, d) + c * (d + 2 * k) + 2 * c * d + c * d + 4 * shape.n_heads
    mlp = _norm_saved(c, d) + 4 * c * f
    return attention, mlp


def plan(shape: ModelShape, run: RunSetup) -> dict[str, int]:
    """Predicted bytes per GPU, by component, and their ``peak``.

    Returns:
        ``parameters``, ``gradients``, ``optimizer``, ``saved_activations``,
        ``layer_recompute``, ``loss_chunk``, ``communication`` and ``peak``.
    """
    run.validate()
    c, d, v = run.compute_bytes, shape.dim, shape.vocab_size
    shards = run.gpus // run.dp_replicate
    tokens = math.ceil(run.batch_size * run.seq_len / run.cp)
    on_gpu = 0 if run.fsdp_cpu_offload else 1
    root_gathered = c * shape.root_params if run.fsdp else 0
    parameters = on_gpu * 4 * shape.params // shards + root_gathered
    sharded_grads = on_gpu * 4 * shape.trained_params // shards
    output_grad = 4 * v * d + (c * v * d if c != 4 else 0)  # the loss's fp32 buffer (+ copy)
    optimizer = on_gpu * 8 * shape.trained_params // shards

    attention, mlp = layer_saved_per_token(shape, c)
    if run.activation_checkpointing:
        kept_layers = min(2, shape.n_layers) if run.activation_offload else shape.n_layers
        layer_inputs = kept_layers * tokens * c * d
        mlp_tokens = min(tokens, run.mlp_chunk_size or tokens)
        # Recompute of one layer: its saved tensors; the MLP's backward adds two [t, F] gradients.
        recompute = tokens * attention + mlp_tokens * (mlp + 2 * c * shape.hidden_dim)
    else:
        layer_inputs = shape.n_layers * tokens * (c * d + attention + mlp)
        recompute = 2 * c * tokens * shape.hidden_dim
    final = tokens * (_norm_saved(c, d) + (c * d if c == 4 else 0))  # its fp32 input is kept, not copied
    grad_hidden = tokens * c * d  # the loss's hidden-state gradient, computed in the forward
    batch_wide = tokens * (2 * shape.head_dim * c + 32)  # rope cos/sin; token, position ids (int64)
    saved = layer_inputs + final + grad_hidden + batch_wide
    loss_chunk = min(tokens, run.loss_chunk_size or auto_chunk_size(v)) * v * (4 + (c if c != 4 else 0))
    communication = 0
    if run.fsdp:
        communication += 2 * c * shape.layer_params + 4 * shape.layer_params
    if run.cp > 1:
        communication += tokens * 2 * shape.kv_dim * (2 * c + 3 * c)  # k/v and dk/dv sent + received, home dk/dv
    flowing = 2 * tokens * c * d  # gradients of a layer's output and input

    persistent = parameters + optimizer + communication
    forward_end = saved + loss_chunk + output_grad
    last_layer_backward = saved + recompute + flowing + output_grad
    backward_end = sharded_grads + c * shape.root_params + output_grad
    peak = persistent + max(forward_end, last_layer_backward, backward_end)
    return {
        "parameters": parameters,
        "gradients": sharded_grads + output_grad,
        "optimizer": optimizer,
        "saved_activations": saved,
        "layer_recompute": recompute + flowing,
        "loss_chunk": loss_chunk,
        "communication": communication,
        "peak": peak,
    }


def longest_seq_len(shape: ModelShape, run: RunSetup, memory_bytes: int, multiple: int = 1024) -> int:
    """The longest ``seq_len`` (a multiple of ``multiple``) whose predicted peak fits in
    ``memory_bytes``; 0 when not even ``multiple`` tokens fit."""
    fits = lambda n: plan(shape, replace(run, seq_len=n * multiple))["peak"] <= memory_bytes  # noqa: E731
    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low * multiple
