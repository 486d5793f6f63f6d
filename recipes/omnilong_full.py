"""Full fine-tuning of a vision-language model on long inputs.

    tune run omnilong_full --config configs/tiny/stage1_text.yaml [key=value ...]
    tune run --nproc_per_node 8 omnilong_full --config configs/qwen2_5_vl_7b/stage1_text.yaml

Setup builds, in order: process group and mesh, tokenizer, data, model on the meta
device, ring attention (cp > 1), activation checkpointing, FSDP2 (optionally with CPU
offload), weights from the HF checkpoint (read on rank 0 only and broadcast shard by
shard), loss, optimizer, lr schedule, and the training state of a checkpoint to resume
from. The loss of a step is the sum of token losses over every micro-batch and rank
divided by the all-reduced count of trained tokens.
"""

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from omnilong.checkpoint.hf_check import check_hf_weights
from omnilong.checkpoint.hf_export import export_hf_checkpoint
from omnilong.checkpoint.run_dir import (
    check_resume_config,
    check_resume_data,
    data_identity,
    prepare_output_dir,
    resume_path,
)
from omnilong.checkpoint.training_state import (
    CheckpointWriteError,
    CheckpointWriter,
    StopRequest,
    checkpoint_run_id,
    fault_injected,
    find_latest_checkpoint,
    load_training_state,
    maybe_inject_sigkill,
    verify_checkpoint,
)
from omnilong.cli import parse
from omnilong.config import instantiate as instantiate_component
from omnilong.config import takes_argument, validate_config
from omnilong.constants import IGNORE_INDEX
from omnilong.data import BadSampleError, collate_padded, load_tokenizer
from omnilong.data.sampler import ResumableDistributedSampler
from omnilong.data.video import FFmpegUnavailableError
from omnilong.distributed import (
    available_cores,
    cpu_threads_per_rank,
    init_distributed,
    resolve_device,
    shutdown_distributed,
)
from omnilong.dry_run import (
    DeviceMemoryTracker,
    DryRunReport,
    DryRunSettings,
    FlopCount,
    LoaderMemory,
    MadeUpRows,
    StepRecord,
    dry_run_offload,
    fake_tensors,
    init_fake_process_group,
)
from omnilong.hf_io import read_hf_config
from omnilong.jsonl import read_appended_jsonl
from omnilong.logs import setup_logging
from omnilong.metrics import MetricsWriter, peak_memory_gb
from omnilong.models.attention import check_attention_device
from omnilong.models.hf_loading import build_model_from_hf_config, check_state_dict_matches, load_native_state_dict
from omnilong.models.parallelize import apply_context_parallel
from omnilong.models.sequence_chunks import set_mlp_chunk_size
from omnilong.models.vision_tokens import with_vision_token_index
from omnilong.optimizer import implementation_kwargs
from omnilong.parallel.activation_offload import activation_offload
from omnilong.parallel.context_parallel import agree_on_decode_failures, shard_batch_for_cp
from omnilong.parallel.fsdp import apply_activation_checkpointing, apply_fsdp
from omnilong.parallel.mesh import ParallelDims, build_mesh
from omnilong.validation import HeldOutShard, held_out_loss

logger = logging.getLogger("omnilong")

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# max_skipped_share is judged once a run has drawn this many rows (the first rows alone say little).
_MIN_ROWS_FOR_SKIPPED_SHARE = 20


def instantiate(key: str, node: DictConfig, *args, **kwargs):
    """The component of config key ``key`` (its ``node``), built with ``args`` and ``kwargs``;
    argument errors name the key at fault."""
    try:
        return instantiate_component(node, *args, **kwargs)
    except TypeError as e:
        raise ValueError(f"config key {key!r} ({node.get('_component_')}): {e}") from e


def one_line(e: BaseException) -> str:
    """The message of ``e`` without the traceback a DataLoader worker's exception carries
    (``Caught X in DataLoader worker ... Original Traceback ...``: its last line is the message)."""
    text = str(e).strip()
    if "\nOriginal Traceback" not in text:
        return text
    return text.splitlines()[-1].removeprefix(f"{type(e).__module__}.{type(e).__qualname__}: ")


class StoppedBySignal(Exception):
    """Training stopped after ``step`` on a signal, with ``checkpoint`` written."""

    def __init__(self, signal: signal.Signals, step: int, checkpoint: Path):
        self.signal, self.step, self.checkpoint = signal, step, checkpoint
        super().__init__(
            f"stopped by {signal.name} after step {step}; checkpoint written: {checkpoint}; "
            "the same command with resume_from_checkpoint=true continues from it"
        )


class OmniLongFullRecipe:
    """The training recipe: ``setup()``, ``train()``, ``cleanup()``."""

    def __init__(self, cfg: DictConfig):
        self.cfg = validate_config(cfg)
        self.dtype = _DTYPES[self.cfg.dtype]
        self.checkpoint_dir = Path(self.cfg.checkpoint_dir)
        self.output_dir = Path(self.cfg.output_dir)
        self._check_inputs()
        # A resumed run keeps its id: only checkpoints with the run's id are ever pruned.
        self.run_id = (self.resume_from and checkpoint_run_id(self.resume_from)) or uuid.uuid4().hex

    def _check_inputs(self) -> None:
        """The device, the checkpoint's config and weights and the checkpoint to resume from:
        a bad one fails here, before processes start talking to each other."""
        self.device = resolve_device(self.cfg.device)
        check_attention_device(self.device, self.dtype)
        self.hf_config = read_hf_config(self.checkpoint_dir)
        check_hf_weights(self.checkpoint_dir, self.hf_config)
        self.resume_from = resume_path(self.cfg)
        if self.resume_from is not None:
            verify_checkpoint(self.resume_from)
            check_resume_config(self.resume_from, self.cfg)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        self._init_process_group()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.dims = ParallelDims.resolve(
            self.world_size, self.cfg.dp_replicate_degree, self.cfg.dp_shard_degree, self.cfg.cp_degree
        )
        self.meshes = build_mesh(self.dims, self.device.type)
        self.is_rank_zero = self.rank == 0
        setup_logging(self.rank)
        threads, why = cpu_threads_per_rank(self.cfg.cpu_threads_per_rank, os.environ, available_cores())
        torch.set_num_threads(threads)
        logger.info("CPU threads per rank: %d (%s)", threads, why)
        self._prepare_output_dir()
        torch.manual_seed(self.cfg.seed)

        self.tokenizer = self._load_tokenizer()
        self.dataset, self.dataloader, self.sampler = self._setup_data()
        self.data_identity = data_identity(self.dataset)
        if self.resume_from is not None:
            allow = self.cfg.allow_config_change_on_resume
            self._on_rank_zero(partial(check_resume_data, self.resume_from, self.data_identity, allow))
        self.val_dataloader = self._setup_validation()
        self.model = self._setup_model()
        self.loss_fn = self._setup_loss()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        params_on_cpu = self.cfg.fsdp_cpu_offload or self.device.type == "cpu"
        self.optimizer = instantiate(
            "optimizer", self.cfg.optimizer, trainable, **implementation_kwargs(self.cfg.optimizer, params_on_cpu)
        )
        self.activation_offload = self._activation_offload()
        self.lr_scheduler = (
            instantiate("lr_scheduler", self.cfg.lr_scheduler, self.optimizer, num_training_steps=self.cfg.max_steps)
            if self.cfg.lr_scheduler is not None
            else None
        )
        self.start_step = self._resume() + 1
        self._setup_metrics()

    def _init_process_group(self) -> None:
        init_distributed(self.device)

    def _prepare_output_dir(self) -> None:
        saves = bool(self.cfg.save_every_n_steps) or self.cfg.save_hf_at_end
        moved, self.run_lock = self._on_rank_zero(partial(prepare_output_dir, self.cfg, saves)) or (None, None)
        if moved is not None:
            logger.info("overwrite_output_dir: the previous run in %s was moved to %s", self.output_dir, moved)

    def _load_tokenizer(self):
        return load_tokenizer(self.cfg.tokenizer_dir or self.checkpoint_dir)

    def _activation_offload(self):
        return activation_offload(self.cfg.activation_offload, self.device)

    def _setup_metrics(self) -> None:
        if self.is_rank_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.cfg, self.output_dir / "config.yaml")
        self._on_rank_zero(partial(self._truncate_metrics, self.start_step))
        metric_logger = (
            instantiate("metric_logger", self.cfg.metric_logger)
            if self.cfg.metric_logger is not None and self.is_rank_zero
            else None
        )
        self.metrics = MetricsWriter(
            self.output_dir, self.cfg.max_steps, self.is_rank_zero, metric_logger, steps_done=self.start_step - 1
        )

    def _on_rank_zero(self, fn):
        """``fn()`` run on rank 0; a ``ValueError`` it raises is raised on every rank."""
        result, error = None, None
        if self.is_rank_zero:
            try:
                result = fn()
            except ValueError as e:
                error = str(e)
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise ValueError(verdict[0])
        return result

    def _setup_model(self) -> torch.nn.Module:
        overrides = {} if self.cfg.rope_theta is None else {"rope_theta": float(self.cfg.rope_theta)}
        with torch.device("meta"):
            model = build_model_from_hf_config(self.hf_config, **overrides)
        self._check_data_matches_model(model)
        args = model.args
        if model.visual is not None:
            model.visual.requires_grad_(not self.cfg.freeze_vision)
            freeze_projector = (
                self.cfg.freeze_vision if self.cfg.freeze_projector is None else self.cfg.freeze_projector
            )
            model.projector.requires_grad_(not freeze_projector)
        if self.dims.cp > 1:
            apply_context_parallel(self.hf_config, model, self.meshes.cp)
        set_mlp_chunk_size(model, self.cfg.mlp_chunk_size)
        if self.cfg.enable_activation_checkpointing:
            apply_activation_checkpointing(model)
        apply_fsdp(
            model,
            self.meshes,
            cpu_offload=self.cfg.fsdp_cpu_offload,
            param_dtype=None if self.dtype == torch.float32 else self.dtype,
        )
        model.to_empty(device="cpu" if self.cfg.fsdp_cpu_offload else self.device)
        self._load_weights(model)
        n_params = sum(p.numel() for p in model.parameters())
        n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info(
            "model: %s, %s parameters (%s trained), %d layers, rope_theta %g, vision tower %s, projector %s",
            self.hf_config.get("model_type"),
            f"{n_params:,}",
            f"{n_trained:,}",
            args.n_layers,
            args.rope_theta,
            *(
                ["none"] * 2
                if model.visual is None
                else [
                    "trained" if any(p.requires_grad for p in part.parameters()) else "frozen"
                    for part in (model.visual.layers, model.projector)
                ]
            ),
        )
        return model

    def _load_weights(self, model: torch.nn.Module) -> None:
        """Rank 0 reads the HF checkpoint; every rank receives its own shards. A bad
        checkpoint is reported on every rank (no rank is left waiting)."""
        state_dict, error = {}, None
        if self.is_rank_zero:
            try:
                state_dict = check_state_dict_matches(model, load_native_state_dict(self.checkpoint_dir))
            except (ValueError, FileNotFoundError) as e:
                error = f"{type(e).__name__}: {e}"
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise ValueError(f"cannot load {self.checkpoint_dir}: {verdict[0]}")
        set_model_state_dict(
            model, state_dict, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )

    def _check_data_matches_model(self, model: torch.nn.Module) -> None:
        """A dataset that places vision tokens must use the model's token ids (its tokenizer is the
        checkpoint's); checked on the meta-device model, before any weight is read. (A video
        dataset's format and sizes come from the checkpoint's config: ``model_config``.)"""
        args = model.args
        datasets = {"dataset": self.dataset}
        if self.val_dataloader is not None:
            datasets["validation_dataset"] = self.val_dataloader.dataset.dataset
        for key, dataset in datasets.items():
            for name in ("video_token_id", "image_token_id"):
                if hasattr(dataset, name) and getattr(dataset, name) != getattr(args, name):
                    raise ValueError(
                        f"the {key}'s {name} {getattr(dataset, name)} is not the model's "
                        f"{getattr(args, name)}: use the tokenizer of the checkpoint"
                    )

    def _setup_loss(self) -> torch.nn.Module:
        if self.cfg.loss.get("reduction", "sum") != "sum":
            raise ValueError("loss.reduction must be 'sum': the recipe divides by the global token count itself")
        return instantiate("loss", self.cfg.loss, reduction="sum")

    def _model_config_for(self, node: DictConfig) -> dict:
        """``{"model_config": the checkpoint's parsed config.json}`` for a dataset component that
        takes it (the video datasets size their inputs from it), else nothing."""
        return {"model_config": self.hf_config} if takes_argument(node, "model_config") else {}

    def _make_dataset(self):
        return instantiate(
            "dataset",
            self.cfg.dataset,
            self.tokenizer,
            max_seq_len=self.cfg.max_seq_len,
            **self._model_config_for(self.cfg.dataset),
        )

    def _decode_cp_share(self, dataset) -> None:
        """Under context parallelism a video dataset decodes, for each sample, only the frames this
        cp rank's vision tower encodes (``decode_cp_share``; the token rows stay whole)."""
        decode_cp_share = getattr(dataset, "decode_cp_share", None)
        if self.dims.cp > 1 and decode_cp_share is not None:
            decode_cp_share(self.meshes.cp.get_local_rank(), self.dims.cp)

    def _setup_data(self):
        dataset = self._make_dataset()
        self._decode_cp_share(dataset)
        dp_mesh = self.meshes.dp
        sampler = ResumableDistributedSampler(
            len(dataset),
            num_replicas=dp_mesh.size(),
            rank=dp_mesh.get_local_rank(),
            shuffle=self.cfg.shuffle,
            seed=self.cfg.seed,
        )
        self.epoch, self.consumed = 0, 0  # position in the data: samples taken in this epoch, all ranks
        self.num_skipped = getattr(dataset, "num_skipped", 0)  # bad samples: dropped while reading + met in training
        self.empty_steps, self.rows_drawn, self.skipped_rows = 0, 0, 0  # this run's (_stop_on_unusable_data)
        dataloader = DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            collate_fn=partial(collate_padded, pad_id=dataset.pad_id),
            **self._loader_options(),
        )
        logger.info(
            "data: %d rows of up to %d tokens (%s); %d samples skipped while reading",
            len(dataset),
            self.cfg.max_seq_len,
            type(dataset).__name__,
            getattr(dataset, "num_skipped", 0),
        )
        return dataset, dataloader, sampler

    def _loader_workers(self) -> int:
        return self.cfg.num_workers

    def _loader_options(self) -> dict:
        """Workers kept across epochs and ``prefetch_factor`` samples ahead each; batches in pinned
        memory on CUDA (copied to the device without blocking, :meth:`_on_device`); workers
        started by spawn when they decode video on CUDA (a forked process cannot use it)."""
        workers = self._loader_workers()
        options = {"num_workers": workers, "pin_memory": self.device.type == "cuda"}
        if workers:
            cuda_decode = OmegaConf.select(self.cfg, "dataset.decode_device") == "cuda"
            options.update(
                persistent_workers=True,
                prefetch_factor=self.cfg.prefetch_factor,
                multiprocessing_context="spawn" if cuda_decode else None,
            )
        return options

    def _setup_validation(self) -> DataLoader | None:
        """The held-out split's loader for this data-parallel rank (:class:`HeldOutShard`), or None."""
        if self.cfg.validation_dataset is None:
            return None
        dataset = instantiate(
            "validation_dataset",
            self.cfg.validation_dataset,
            self.tokenizer,
            max_seq_len=self.cfg.max_seq_len,
            **self._model_config_for(self.cfg.validation_dataset),
        )
        self._decode_cp_share(dataset)
        dp_mesh = self.meshes.dp
        shard = HeldOutShard(dataset, dp_mesh.size(), dp_mesh.get_local_rank())
        logger.info(
            "validation data: %d rows (%s), %d batches per rank, evaluated %s",
            len(dataset),
            type(dataset).__name__,
            -(-len(shard) // self.cfg.batch_size),
            f"every {self.cfg.eval_every_n_steps} steps and at the last"
            if self.cfg.eval_every_n_steps
            else "at the last step",
        )
        return DataLoader(
            shard,
            batch_size=self.cfg.batch_size,
            shuffle=False,
            num_workers=self.cfg.num_workers,
            collate_fn=partial(collate_padded, pad_id=dataset.pad_id),
        )

    def _resume(self) -> int:
        """Load the checkpoint asked for by ``resume_from_checkpoint``; returns its step (0: none)."""
        path = self.resume_from
        if path is None:
            if self.cfg.resume_from_checkpoint:
                logger.info("resume_from_checkpoint: no checkpoint under %s yet, starting from step 1", self.output_dir)
            return 0
        trainer = load_training_state(path, self.model, self.optimizer, self.lr_scheduler)
        self.epoch, self.consumed, self.num_skipped = trainer["epoch"], trainer["consumed"], trainer["num_skipped"]
        logger.info(
            "resumed from %s (step %d, epoch %d, %d samples into it)", path, trainer["step"], self.epoch, self.consumed
        )
        return trainer["step"]

    def _truncate_metrics(self, start_step: int) -> None:
        """Drop metrics of steps that will be trained again (a run killed after its last checkpoint)
        and a torn last record (:func:`read_appended_jsonl`: a record that is not JSON otherwise
        is an error naming the file and line)."""
        path = self.output_dir / "metrics.jsonl"
        if path.exists():
            kept = [record for record in read_appended_jsonl(path) if record["step"] < start_step]
            path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def _save_checkpoint(self, step: int) -> None:
        """Start writing the checkpoint of ``step`` in the background (:class:`CheckpointWriter`)."""
        trainer = {"step": step, "epoch": self.epoch, "consumed": self.consumed, "num_skipped": self.num_skipped}
        self.checkpoints.save(
            step, self.model, self.optimizer, self.lr_scheduler, trainer, self.cfg, self.data_identity
        )

    def _finish_checkpoint(self) -> Path | None:
        """Wait for the checkpoint being written (collective) and put it in place; returns it."""
        path = self.checkpoints.finish()
        if path is not None:
            logger.info("checkpoint written: %s", path)
        return path

    # ------------------------------------------------------------------ train
    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches for this rank, forever (epoch after epoch), from the saved data
        position on, with the model's positions of the full sequence (``model.with_positions``);
        with context parallelism, this rank's shard of each full-sequence batch."""
        dp = self.meshes.dp.size()
        while True:
            self.sampler.set_epoch(self.epoch, self.consumed)
            for batch in self.dataloader:
                self.consumed += batch["input_ids"].shape[0] * dp
                yield self._model_batch(batch, self.dataset)
            self.epoch, self.consumed = self.epoch + 1, 0

    def _model_batch(self, batch: dict[str, torch.Tensor], dataset) -> dict[str, torch.Tensor]:
        """A collated batch of ``dataset`` with the model's positions of the full rows
        (``model.with_positions``); with context parallelism, this rank's shard of it, the
        samples whose video some cp rank could not decode skipped or refused on every rank alike."""
        batch = self.model.with_positions(batch)
        if self.dims.cp > 1:
            if "decode_failures" in batch:
                batch = self._agree_on_decode_failures(batch, dataset)
            batch = shard_batch_for_cp(
                with_vision_token_index(batch, self.model.vision_token_ids), self.meshes.cp, dataset.pad_id
            )
        return batch

    def _agree_on_decode_failures(self, batch: dict[str, torch.Tensor], dataset) -> dict[str, torch.Tensor]:
        """``batch`` with the samples whose video some cp rank could not decode skipped, as every
        rank of the cp group agrees (:func:`agree_on_decode_failures`).

        Raises:
            BadSampleError: there are such samples and ``dataset`` does not skip bad samples (names them).
        """
        batch, failed = agree_on_decode_failures(batch, self.meshes.cp)
        if failed:
            names = "; ".join(dataset.sample_name(i) for i in failed)
            if not dataset.skip_bad_samples:
                raise BadSampleError(
                    f"{names}: a video's frames cannot be decoded on a cp rank (its log says why); "
                    "set dataset.skip_bad_samples: true to skip such samples"
                )
            logger.warning("skipping %d samples whose video a cp rank cannot decode: %s", len(failed), names)
        return batch

    def _validate(self) -> dict[str, float]:
        """``val_loss`` and ``val_tokens`` of the whole held-out split (:func:`held_out_loss`)."""
        dataset = self.val_dataloader.dataset.dataset
        batches = (self._on_device(self._model_batch(batch, dataset), dataset) for batch in self.val_dataloader)
        loss, tokens = held_out_loss(self.model, self.loss_fn, batches, self.device)
        return {"val_loss": loss, "val_tokens": tokens}

    def _on_device(self, batch: dict[str, torch.Tensor], dataset) -> dict[str, torch.Tensor]:
        """``batch`` copied to the device (without blocking: from pinned memory on CUDA), where a
        video dataset's uint8 pixels become the model's fp32 ones (``normalize_pixels``)."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        normalize_pixels = getattr(dataset, "normalize_pixels", None)
        return batch if normalize_pixels is None else normalize_pixels(batch)

    def _micro_step(self, batch: dict[str, torch.Tensor], global_tokens: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its (local) summed token loss."""
        labels = batch["labels"]  # stays on the host: the loss finds its trained tokens there, without a sync
        batch = self._on_device({k: v for k, v in batch.items() if k not in ("labels", "skipped")}, self.dataset)
        with self.activation_offload:
            hidden = self.model(**batch, return_hidden=True)
        weight = self.model.output.weight
        loss_sum, _ = self.loss_fn(hidden, weight, labels)
        (loss_sum / global_tokens.clamp(min=1)).backward()
        return loss_sum.detach()

    def _clip_gradients(self) -> torch.Tensor:
        """Clips the gradients to ``clip_grad_norm`` (if set); returns their total norm (a 0-d tensor)."""
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.cfg.clip_grad_norm if self.cfg.clip_grad_norm is not None else math.inf
        )
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def _stop_on_unusable_data(self, trained_tokens: float, skipped_rows: int, rows: int) -> None:
        """Count a step of ``trained_tokens`` (all ranks) over ``rows`` rows, ``skipped_rows`` of
        them holding a skipped sample; stop the run (on every rank: the counts are all-reduced)
        after ``max_empty_steps`` steps in a row without a trained token, or once more than
        ``max_skipped_share`` of the rows drawn in this run held a skipped sample.

        Raises:
            BadSampleError: naming the counts.
        """
        cfg = self.cfg
        self.empty_steps = 0 if trained_tokens > 0 else self.empty_steps + 1
        self.rows_drawn, self.skipped_rows = self.rows_drawn + rows, self.skipped_rows + skipped_rows
        counts = (
            f"{self.skipped_rows} of the {self.rows_drawn} rows drawn in this run held an unusable sample "
            f"({self.num_skipped} samples skipped in all)"
        )
        if cfg.max_empty_steps is not None and self.empty_steps >= cfg.max_empty_steps:
            raise BadSampleError(
                f"stopped: {self.empty_steps} steps in a row trained no token on any rank (max_empty_steps="
                f"{cfg.max_empty_steps}); {counts}: check the data (its samples' videos, assistant turns, lengths)"
            )
        share = cfg.max_skipped_share
        if (
            share is not None
            and self.rows_drawn >= _MIN_ROWS_FOR_SKIPPED_SHARE
            and self.skipped_rows > share * self.rows_drawn
        ):
            raise BadSampleError(
                f"stopped: {counts}, more than max_skipped_share={share}: check the data, or raise max_skipped_share"
            )

    def _train_step(
        self, micro_batches: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step over ``micro_batches`` (this rank's).

        Returns:
            The summed token loss of this rank, the gradient norm (0-d tensors, not yet read
            back to the host), and the all-reduced ``[trained tokens, input tokens]`` (float64, host).
        """
        counts = torch.tensor(
            [
                sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches),
                sum(mb["input_ids"].numel() for mb in micro_batches),
            ],
            dtype=torch.float64,
        )
        dist.all_reduce(counts)  # over every rank: dp ranks hold other rows, cp ranks other shards
        global_tokens = counts[0].to(self.device)
        rows = torch.tensor(  # [skipped samples, rows holding one, rows]
            [
                sum(int(mb["skipped"].sum()) for mb in micro_batches if "skipped" in mb),
                sum(int((mb["skipped"] > 0).sum()) for mb in micro_batches if "skipped" in mb),
                sum(mb["input_ids"].shape[0] for mb in micro_batches),
            ]
        )
        dist.all_reduce(rows, group=self.meshes.dp.get_group())  # cp ranks of a group share rows
        self.num_skipped += int(rows[0])
        self._stop_on_unusable_data(float(counts[0]), int(rows[1]), int(rows[2]))

        loss_sum = sum(self._micro_step(mb, global_tokens) for mb in micro_batches)
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return loss_sum, grad_norm, counts

    def train(self) -> None:
        """The training loop. SIGTERM or SIGINT stops it after the step all ranks agree on, with a
        checkpoint (:class:`StoppedBySignal`)."""
        cfg = self.cfg
        batches = self._batches()
        self.checkpoints = CheckpointWriter(self.output_dir, cfg.keep_last_n_checkpoints, self.run_id)
        self.model.train()
        self.stop_request = StopRequest(log=self.is_rank_zero).install()
        for step in range(self.start_step, cfg.max_steps + 1):
            start = time.perf_counter()
            micro_batches = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
            lr = self.optimizer.param_groups[0]["lr"]
            loss_sum, grad_norm, counts = self._train_step(micro_batches)
            grad_norm = float(grad_norm)
            global_inputs = counts[1]

            # one all-reduce: the loss, the ranks asked to stop by each signal, the ranks still writing
            flags = [self.stop_request.signal == s for s in StopRequest.SIGNALS] + [self.checkpoints.busy()]
            reduced = torch.cat([loss_sum.double().cpu().reshape(1), torch.tensor(flags, dtype=torch.float64)])
            dist.all_reduce(reduced)
            loss_sum, asked, writing = reduced[0], reduced[1:-1].tolist(), bool(reduced[-1])
            stop = next((s for s, n in zip(StopRequest.SIGNALS, asked) if n), None)
            elapsed = time.perf_counter() - start
            self.metrics.step_done(int(global_inputs))
            last = step == cfg.max_steps
            stop = None if last else stop
            evaluate = self.val_dataloader is not None and (
                last or bool(cfg.eval_every_n_steps) and step % cfg.eval_every_n_steps == 0
            )
            if step % cfg.log_every_n_steps == 0 or last or evaluate or stop is not None:
                self.metrics.log(
                    step,
                    {
                        "loss": float(loss_sum / max(float(counts[0]), 1.0)),
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "num_tokens": int(counts[0]),
                        "tokens_per_sec": float(global_inputs) / elapsed,
                        "peak_memory_gb": peak_memory_gb(self.device),
                        "num_skipped": self.num_skipped,
                        **(self._validate() if evaluate else {}),
                    },
                )
            if not writing:
                self._finish_checkpoint()
            if (cfg.save_every_n_steps and (step % cfg.save_every_n_steps == 0 or last)) or (
                last and cfg.save_hf_at_end or stop is not None
            ):
                self._save_checkpoint(step)
            if fault_injected("after_step", step):  # the crash tests kill a run whose checkpoints are written
                self._finish_checkpoint()
            maybe_inject_sigkill("after_step", step)
            if stop is not None:
                raise StoppedBySignal(stop, step, self._finish_checkpoint())
        self._finish_checkpoint()
        checkpoint = find_latest_checkpoint(self.output_dir) if cfg.save_every_n_steps or cfg.save_hf_at_end else None
        if cfg.save_hf_at_end:
            self._export_hf(checkpoint)
        self.metrics.summary(
            cfg.max_steps - self.start_step + 1, checkpoint, self.output_dir / "hf" if cfg.save_hf_at_end else None
        )

    def _export_hf(self, checkpoint: Path) -> None:
        """Rank 0 writes ``output_dir/hf`` from the final checkpoint, reading it shard by shard
        (no rank gathers the whole model); the others wait."""
        if self.is_rank_zero:
            hf_dir = self.output_dir / "hf"
            if hf_dir.exists():
                logger.info("replacing the previous export in %s", hf_dir)
                shutil.rmtree(hf_dir)
            export_hf_checkpoint(checkpoint, self.checkpoint_dir, hf_dir)
            logger.info("Hugging Face checkpoint written: %s", hf_dir)
        dist.barrier()

    def cleanup(self) -> None:
        """Close the metrics, drop what holds process groups (the model's ring attention and
        FSDP state, the optimizer, the data iterators) and shut the groups down; works after
        a setup that stopped half-way too."""
        if hasattr(self, "metrics"):
            self.metrics.close()
        if hasattr(self, "stop_request"):
            self.stop_request.uninstall()
        if getattr(self, "run_lock", None) is not None:
            self.run_lock.release()
        for name in ("lr_scheduler", "optimizer", "model", "loss_fn", "dataloader", "checkpoints"):
            self.__dict__.pop(name, None)
        meshes = self.__dict__.pop("meshes", None)
        shutdown_distributed(meshes.world if meshes is not None else None)


class TracedSteps:
    """Training steps under the dry run's memory tracker (``self.tracker``) and FLOP count:
    the dry run's, and a real run's when it is compared with a dry run (the same code)."""

    def _micro_step(self, batch: dict[str, torch.Tensor], global_tokens: torch.Tensor) -> torch.Tensor:
        """As the recipe's, with the batch's copy on the device counted while the step runs."""
        self.tracker.reset_mod_stats()  # the tracker's per-module records hold one forward each
        on_device = {key: value if key == "labels" else value.clone() for key, value in batch.items()}
        self.tracker.track_inputs(on_device)
        return super()._micro_step(on_device, global_tokens)

    def _traced_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepRecord:
        """One training step under the memory tracker and a FLOP counter."""
        self.tracker.device_peak, self.tracker.host_peak = {}, {}
        start = time.perf_counter()
        with FlopCount() as flops:
            self._train_step(micro_batches)
        return StepRecord(
            tokens=sum(mb["input_ids"].numel() for mb in micro_batches),
            device=dict(self.tracker.device_peak),
            host=dict(self.tracker.host_peak),
            flops=flops.flops,
            seconds=time.perf_counter() - start,
        )


class MadeUpRun(OmniLongFullRecipe):
    """The recipe on made-up rows (:class:`MadeUpRows`: the shapes the config's data would give)
    and untrained weights, reading no checkpoint weights, no data and no tokenizer, and writing
    nothing: what a dry run runs on fake tensors, and what ``tools/gpu_check.py`` runs for real
    to compare with it. The model's shapes come from ``settings`` (:meth:`DryRunSettings.model_config`)."""

    def __init__(self, cfg: DictConfig, settings: DryRunSettings):
        self.settings = settings
        super().__init__(cfg)

    def _check_inputs(self) -> None:
        self.device = resolve_device(self.cfg.device)
        self.hf_config, self.model_source = self.settings.model_config(self.checkpoint_dir)
        self.resume_from = None

    def _prepare_output_dir(self) -> None:
        pass

    def _load_tokenizer(self):
        return None

    def _make_dataset(self) -> MadeUpRows:
        return MadeUpRows(self.cfg.dataset, self.cfg.max_seq_len, self.hf_config)

    def _loader_workers(self) -> int:
        return 0  # in a dry run the rows' pixels are fake tensors of this process

    def _setup_validation(self) -> None:
        return None

    def _load_weights(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(std=0.02)

    def _resume(self) -> int:
        return 0

    def _setup_metrics(self) -> None:
        pass


class DryRunRecipe(TracedSteps, MadeUpRun):
    """The recipe at full size on one CPU (:mod:`omnilong.dry_run`): :class:`MadeUpRun` on fake
    tensors, as rank 0 of a fake process group of the job's world size, its steps traced.
    ``train`` returns a :class:`DryRunReport`."""

    def _check_inputs(self) -> None:
        self.device = torch.device("cpu")  # stands for the config's device (dry_run.fake_tensors)
        self.hf_config, self.model_source = self.settings.model_config(self.checkpoint_dir)
        self.resume_from = None

    def _init_process_group(self) -> None:
        init_fake_process_group(self.settings.world_size)

    def _load_weights(self, model: torch.nn.Module) -> None:
        pass  # fake tensors hold no values

    def _activation_offload(self):
        self.tracker = DeviceMemoryTracker(self.model, self.optimizer, self.cfg.fsdp_cpu_offload)
        self.tracker.tag_module(self.loss_fn, "loss")
        return dry_run_offload(self.tracker) if self.cfg.activation_offload else contextlib.nullcontext()

    def train(self) -> DryRunReport:
        cfg, dims = self.cfg, self.dims
        report = DryRunReport(
            config=str(self.settings.config),
            settings=self.settings,
            model_source=self.model_source,
            mesh=f"dp_replicate {dims.dp_replicate} x dp_shard {dims.dp_shard} x cp {dims.cp}",
            rows=self.dataset.description,
            tokens_per_step=cfg.batch_size * cfg.max_seq_len * cfg.gradient_accumulation_steps * dims.dp,
            max_seq_len=cfg.max_seq_len,
            length_multiple=max(1024, 2 * dims.cp),
            video_tokens=self.dataset.video["tokens"] if self.dataset.video else 0,
            loader=LoaderMemory(cfg.num_workers, cfg.prefetch_factor, cfg.batch_size * self.dataset.row_bytes())
            if cfg.num_workers
            else None,
        )
        batches = self._batches()
        self.model.train()
        with self.tracker:
            for step in range(1, self.settings.steps + 1):
                record = self._traced_step([next(batches) for _ in range(cfg.gradient_accumulation_steps)])
                report.steps.append(record)
                logger.info(
                    "dry run: step %d traced in %.1f s: peak %.2f GiB", step, record.seconds, record.peak / 2**30
                )
            if self.settings.longest:
                shorter = self.dataset.fixed_tokens + (cfg.max_seq_len - self.dataset.fixed_tokens) // 2
                rows = MadeUpRows(cfg.dataset, shorter, self.hf_config)
                self._decode_cp_share(rows)
                batch = self._model_batch(collate_padded([rows[0]] * cfg.batch_size, rows.pad_id), rows)
                report.shorter = self._traced_step([batch])
        return report


@parse
def recipe_main(cfg: DictConfig, dry_run: DryRunSettings | None = None) -> int:
    """Full fine-tuning of a vision-language model on long inputs.

    tune run [TORCHRUN-OPTIONS] omnilong_full --config <config> [key=value ...]
    tune run omnilong_full --config <config> --dry-run --world-size 8 [key=value ...]

    <config> is a YAML path or a shipped config name (`omnilong ls`: tiny/stage1_text, ...).
    """
    if dry_run is not None:
        return _dry_run_main(cfg, dry_run)
    recipe = None
    try:
        recipe = OmniLongFullRecipe(cfg)
        recipe.setup()
    except (ValueError, FileNotFoundError, FFmpegUnavailableError) as e:  # bad config, data, checkpoint: one line
        print(f"omnilong_full: error: {e}", file=sys.stderr)
        if recipe is not None:
            recipe.cleanup()
        return 1
    try:
        recipe.train()
    except KeyboardInterrupt:
        logger.warning("interrupted: stopping cleanly")
        return 130
    except StoppedBySignal as e:
        if recipe.is_rank_zero:
            print(f"omnilong_full: {e}", file=sys.stderr)
        return 128 + e.signal
    except (BadSampleError, CheckpointWriteError) as e:  # the launcher stops the other ranks when this one exits
        print(f"omnilong_full: error: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        recipe.cleanup()
    return 0


def _dry_run_main(cfg: DictConfig, settings: DryRunSettings) -> int:
    """Dry-run ``cfg`` (:class:`DryRunRecipe`); prints the report. A config that cannot run
    fails here as it would on the cluster: one line, status 1."""
    recipe = None
    try:
        with fake_tensors("cuda" if cfg.get("device", "auto") != "cpu" else "cpu"):
            recipe = DryRunRecipe(cfg, settings)
            recipe.setup()
            report = recipe.train()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"omnilong_full: error: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        if recipe is not None:
            recipe.cleanup()
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(recipe_main())
