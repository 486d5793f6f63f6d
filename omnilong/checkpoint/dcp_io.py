"""Reading ``torch.distributed.checkpoint`` directories safely, in one process or many.

DCP's own reader unpickles ``.metadata`` and non-tensor entries without restriction; the
reader and planner here accept only DCP's metadata classes and ``weights_only`` data, so a
checkpoint from elsewhere cannot run code when it is loaded.
"""

import dataclasses
import enum
import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

MODEL_PREFIX = "model."  # DCP flattens state["model"][key] to "model.<key>"
DCP_METADATA_NAME = ".metadata"


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``, refusing every global but DCP's metadata dataclasses and
    enums, ``torch.Size``, dtypes, layouts and paths (plain ``pickle.load`` runs any code)."""

    _ALLOWED = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("pathlib", "Path"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
    }

    def find_class(self, module: str, name: str) -> Any:
        dcp_module = module.startswith("torch.distributed.checkpoint.")
        if "." not in name and ((module, name) in self._ALLOWED or module == "torch" or dcp_module):
            obj = super().find_class(module, name)
            if (
                (module, name) in self._ALLOWED
                or (module == "torch" and isinstance(obj, torch.dtype))
                or (
                    dcp_module
                    and isinstance(obj, type)
                    and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
                )
            ):
                return obj
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's metadata")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with a restricted unpickler for ``.metadata`` (tensors are read by
    DCP with ``torch.load(weights_only=True)``)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / DCP_METADATA_NAME
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except Exception as e:  # a damaged pickle fails in many ways; say which file
            raise ValueError(f"cannot read {path} (truncated or not a DCP checkpoint?): {e}") from e
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path} is not DCP metadata (holds a {type(metadata).__name__})")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
        return metadata


def read_checkpoint_metadata(checkpoint: Path) -> Metadata:
    """DCP metadata of a checkpoint directory, after checking that every data file it names
    is present and long enough.

    Raises:
        FileNotFoundError: no ``.metadata``, or a data file is missing (names it).
        ValueError: ``.metadata`` is unreadable, or a data file is truncated (names it).
    """
    if not (checkpoint / DCP_METADATA_NAME).is_file():
        raise FileNotFoundError(
            f"{checkpoint / DCP_METADATA_NAME} not found: {checkpoint} is not a complete training checkpoint "
            "(expected <output_dir>/checkpoints/step_N)"
        )
    metadata = SafeFileSystemReader(checkpoint).read_metadata()
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        path = checkpoint / name
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint data file {path} is missing (named by {DCP_METADATA_NAME})")
        if path.stat().st_size < size:
            raise ValueError(
                f"checkpoint data file {path} is truncated: {path.stat().st_size} bytes, metadata expects {size}"
            )
    return metadata


def model_tensor_metadata(metadata: Metadata) -> dict[str, TensorStorageMetadata]:
    """Native key -> storage metadata of every tensor of ``state["model"]``."""
    return {
        fqn[len(MODEL_PREFIX) :]: md
        for fqn, md in metadata.state_dict_metadata.items()
        if fqn.startswith(MODEL_PREFIX) and isinstance(md, TensorStorageMetadata)
    }


def load_model_tensors(
    checkpoint: Path, tensors: dict[str, TensorStorageMetadata] | None = None
) -> dict[str, torch.Tensor]:
    """Read ``tensors`` (native key -> metadata; default: the whole model) from the
    checkpoint, on CPU, in their stored dtypes, without a process group.

    Raises:
        ValueError: DCP cannot read them (names the checkpoint).
    """
    if tensors is None:
        tensors = model_tensor_metadata(read_checkpoint_metadata(checkpoint))
    state = {MODEL_PREFIX + key: torch.empty(md.size, dtype=md.properties.dtype) for key, md in tensors.items()}
    try:
        with warnings.catch_warnings():  # DCP warns that no_dist loads in one process, as intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeFileSystemReader(checkpoint), planner=DefaultLoadPlanner(), no_dist=True)
    except Exception as e:  # DCP wraps read errors in its own exception types
        raise ValueError(f"cannot read checkpoint {checkpoint} (truncated or corrupt?): {e}") from e
    return {fqn[len(MODEL_PREFIX) :]: tensor for fqn, tensor in state.items()}


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP load planner that unpickles non-tensor entries (optimizer hyper-parameters,
    scheduler and trainer state) with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
