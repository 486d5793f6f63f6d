from omnilong.data.chat import ChatDataset, chat_dataset
from omnilong.data.collate import collate_padded
from omnilong.data.llava_video import llava_video_sft_dataset
from omnilong.data.mixing import WeightedMix
from omnilong.data.packed_text import PackedRows, PackedTextDataset
from omnilong.data.packing import PackedDataset
from omnilong.data.prepared import PreparedDataError
from omnilong.data.prepared_datasets import (
    prepared_chat_dataset,
    prepared_llava_video_sft_dataset,
    prepared_text_dataset,
    prepared_video_sft_dataset,
)
from omnilong.data.tokenizer import load_tokenizer
from omnilong.data.video import VideoDecodeError, VideoOptions, decode_video, process_video
from omnilong.data.video_sft import BadSampleError, VideoSFTDataset, video_sft_dataset

__all__ = [
    "BadSampleError",
    "ChatDataset",
    "PackedDataset",
    "PackedRows",
    "PackedTextDataset",
    "PreparedDataError",
    "VideoDecodeError",
    "VideoOptions",
    "VideoSFTDataset",
    "WeightedMix",
    "chat_dataset",
    "collate_padded",
    "decode_video",
    "llava_video_sft_dataset",
    "load_tokenizer",
    "prepared_chat_dataset",
    "prepared_llava_video_sft_dataset",
    "prepared_text_dataset",
    "prepared_video_sft_dataset",
    "process_video",
    "video_sft_dataset",
]
