from omnilong.data.chat import ChatDataset, chat_dataset, python_stdlib_chat_dataset
from omnilong.data.collate import collate_padded
from omnilong.data.packed_text import PackedTextDataset, python_stdlib_dataset
from omnilong.data.packing import PackedDataset
from omnilong.data.tokenizer import load_tokenizer
from omnilong.data.video import VideoDecodeError, VideoOptions, decode_video, process_video
from omnilong.data.video_sft import BadSampleError, VideoSFTDataset, video_sft_dataset

__all__ = [
    "BadSampleError",
    "ChatDataset",
    "PackedDataset",
    "PackedTextDataset",
    "VideoDecodeError",
    "VideoOptions",
    "VideoSFTDataset",
    "chat_dataset",
    "collate_padded",
    "decode_video",
    "load_tokenizer",
    "process_video",
    "python_stdlib_chat_dataset",
    "python_stdlib_dataset",
    "video_sft_dataset",
]
