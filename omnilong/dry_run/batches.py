"""The rows a config's data would give, made up: what a dry run trains on.

A row has the config's ``max_seq_len`` tokens, the keys its dataset's items have, and, for
video data, one video of the config's ``max_frames`` frames (a 1280x720 source) sized by the
dataset's own rules (the pixel budget for Qwen2.5-VL, the tower's crop for LLaVA-OneVision)
with the vision-token count the dataset would give it, its pixels uint8 as the datasets' items
carry them (normalised on the device: :meth:`MadeUpRows.normalize_pixels`). Token ids, labels,
document ids and vision grids are real tensors (the host reads them); the pixels are made inside the dry run's
fake tensor mode, so they take no memory; under context parallelism only this rank's share of
them, as the video datasets decode (:meth:`MadeUpRows.decode_cp_share`). Every token after the video (or, for text, every
token) is trained: the most work the loss can have.
"""

import inspect
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from omnilong.config import component_from_path
from omnilong.constants import IGNORE_INDEX
from omnilong.data.llava_video import llava_video_format
from omnilong.data.video import VideoOptions, video_grid
from omnilong.data.video_sft import QwenVideoFormat
from omnilong.vision_shares import unit_share

SOURCE_VIDEO = (1280, 720)  # width, height of the made-up source video
_TEXT_TOKEN = 1000  # any ordinary token id


def _arguments(node: DictConfig) -> dict[str, Any]:
    """The dataset component's arguments: its defaults, then the config's values."""
    signature = inspect.signature(component_from_path(node["_component_"]))
    defaults = {name: p.default for name, p in signature.parameters.items() if p.default is not p.empty}
    return {**defaults, **{key: value for key, value in node.items() if key != "_component_"}}


class MadeUpRows(Dataset):
    """``length`` identical rows of what the dataset of ``node`` would give (see the module's
    docstring).

    Args:
        node: the config's ``dataset`` node.
        max_seq_len: tokens per row.
        model_config: the checkpoint's parsed ``config.json``.
        length: rows in the dataset.

    Raises:
        ValueError: the config's largest video does not fit in ``max_seq_len`` tokens.
    """

    num_skipped = 0
    cp_rank, cp_size = 0, 1

    def __init__(self, node: DictConfig, max_seq_len: int, model_config: dict[str, Any], length: int = 1024):
        self.max_seq_len, self.length = max_seq_len, length
        self.pad_id = 0
        self.video: dict[str, Any] | None = None
        self.fixed_tokens = 0  # tokens every row has whatever max_seq_len: its video's
        args = _arguments(node)
        if "max_frames" not in args:  # text
            self.description = f"text rows of {max_seq_len:,} tokens, all trained"
            return
        if model_config.get("model_type") == "llava_onevision":
            video_format = llava_video_format(
                model_config, args.get("frame_size"), args.get("patch_size"), args["image_mean"], args["image_std"]
            )
            options = VideoOptions(fps=args["fps"], max_frames=args["max_frames"])
            self.video_token_id = model_config.get("video_token_index", model_config.get("video_token_id"))
            self.image_token_id = model_config.get("image_token_index", model_config.get("image_token_id"))
        else:
            video_format = QwenVideoFormat.from_model_config(model_config)
            options = VideoOptions(
                args["fps"],
                args["max_frames"],
                args["video_min_pixels"],
                args["video_max_pixels"],
                args["video_total_pixels"],
            )
            self.video_token_id, self.image_token_id = model_config["video_token_id"], model_config["image_token_id"]
        frames = options.max_frames
        width, height = SOURCE_VIDEO
        size = video_format.sizes([(frames, height, width)], options)[0]
        tokens = video_format.num_tokens(frames, size)
        if tokens + 2 > max_seq_len:
            raise ValueError(
                f"the config's largest video ({frames} frames of {width}x{height} at max_frames, sized "
                f"{size[1]}x{size[0]}) gives {tokens:,} vision tokens, more than max_seq_len {max_seq_len:,}: "
                "raise max_seq_len or lower max_frames (or the pixel budget)"
            )
        self.fixed_tokens = tokens + 2
        self.video = {"format": video_format, "frames": frames, "size": size, "tokens": tokens, "options": options}
        qwen = video_format.model_type == "qwen2_5_vl"
        self.vision_start_end = (
            (model_config["vision_start_token_id"], model_config["vision_end_token_id"]) if qwen else None
        )
        self.description = (
            f"video rows of {max_seq_len:,} tokens: {frames} frames sized {size[1]}x{size[0]} "
            f"({tokens:,} vision tokens), the {max_seq_len - tokens:,} text tokens around them trained"
        )

    def __len__(self) -> int:
        return self.length

    def decode_cp_share(self, rank: int, cp: int) -> None:
        """Rows for cp rank ``rank`` of ``cp``: the whole token row, the pixels of this rank's
        frame units only (:func:`~omnilong.vision_shares.unit_share`), as the video datasets give."""
        self.cp_rank, self.cp_size = rank, cp

    def row_bytes(self) -> int:
        """Bytes of one row as the loader holds it (its cp share's uint8 pixels, token rows)."""
        return sum(value.numel() * value.element_size() for value in self[0].values())

    def normalize_pixels(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """As the video datasets' (:meth:`~omnilong.data.video_sft.VideoSFTDataset.normalize_pixels`):
        the batch's uint8 pixels made the model's fp32 ones, on its device."""
        if "pixel_values_videos" not in batch:
            return batch
        return {**batch, "pixel_values_videos": self.video["format"].normalize(batch["pixel_values_videos"])}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = torch.full((self.max_seq_len,), _TEXT_TOKEN)
        trained = torch.ones(self.max_seq_len, dtype=torch.bool)
        row = {"document_ids": torch.zeros(self.max_seq_len, dtype=torch.long)}
        if self.video is None:
            row["position_ids"] = torch.arange(self.max_seq_len)
        else:
            start = 16  # a short prompt before the video
            first = start + (self.vision_start_end is not None)
            input_ids[first : first + self.video["tokens"]] = self.video_token_id
            if self.vision_start_end is not None:  # <|vision_start|> video <|vision_end|>
                input_ids[start], input_ids[first + self.video["tokens"]] = self.vision_start_end
            trained[: first + self.video["tokens"] + 1] = False
            row.update(self._pixels())
            row["skipped"] = torch.tensor(False)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:-1] = torch.where(trained[1:], input_ids[1:], IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels, **row}

    def _pixels(self) -> dict[str, torch.Tensor]:
        """The video's processed pixels (fake inside the dry run's tensor mode) and its grid."""
        video_format, frames, (height, width) = self.video["format"], self.video["frames"], self.video["size"]
        if video_format.model_type == "llava_onevision":
            crop = video_format.crop
            lo, hi = unit_share(frames, self.cp_rank, self.cp_size)
            return {
                "pixel_values_videos": torch.zeros(hi - lo, 3, crop, crop, dtype=torch.uint8),
                "video_num_frames": torch.tensor([frames]),
            }
        patching = video_format.patching
        grid = video_grid(frames, height, width, patching)
        lo, hi = unit_share(grid[0], self.cp_rank, self.cp_size)
        return {
            "pixel_values_videos": torch.zeros((hi - lo) * grid[1] * grid[2], patching.patch_dim, dtype=torch.uint8),
            "video_grid_thw": torch.tensor([grid]),
            "second_per_grid_ts": torch.tensor([patching.temporal / self.video["options"].fps]),
        }
