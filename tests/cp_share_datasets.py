"""The tiny families' video datasets over conftest's ``cp_share_videos`` at the settings the
cp-share tests read them with (every cp rank gets several frame pairs / frames of the long
video), and two of their samples as one batch."""

from pathlib import Path

from omnilong.data import collate_padded, llava_video_sft_dataset, load_tokenizer, video_sft_dataset
from omnilong.testing.tiny_llava_onevision import TINY_CROP, TINY_PATCH
from omnilong.testing.tiny_qwen2_5_vl import TINY_MAX_PIXELS, TINY_MIN_PIXELS


def qwen_dataset(checkpoint: Path, data: Path, **kwargs):
    """``video_sft_dataset`` of the tiny Qwen2.5-VL at 8 fps (``kwargs`` passed on)."""
    return video_sft_dataset(
        load_tokenizer(checkpoint),
        data,
        max_seq_len=4096,
        fps=8.0,
        video_min_pixels=TINY_MIN_PIXELS,
        video_max_pixels=TINY_MAX_PIXELS,
        **kwargs,
    )


def llava_dataset(checkpoint: Path, data: Path, **kwargs):
    """``llava_video_sft_dataset`` of the tiny LLaVA-OneVision at 8 fps, at most 64 frames."""
    return llava_video_sft_dataset(
        load_tokenizer(checkpoint),
        data,
        max_seq_len=8192,
        fps=8.0,
        max_frames=64,
        frame_size=TINY_CROP,
        patch_size=TINY_PATCH,
        **kwargs,
    )


def two_samples(dataset) -> dict:
    """The first two samples of ``dataset`` collated in one batch (only a rank's pixels after
    ``decode_cp_share``), their pixels normalised as the recipe does on the device."""
    batch = dataset.normalize_pixels(collate_padded([dataset[0], dataset[1]], dataset.pad_id))
    batch.pop("skipped")
    return batch
