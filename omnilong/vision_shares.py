"""Which frame units of each video a context-parallel rank encodes: one rule, shared by the data
(a cp rank decodes and processes only its units: :class:`~omnilong.data.video_sft.VideoSFTDataset`)
and the vision towers' splits (a rank encodes its units and the features are gathered:
``omnilong.models.<family>.parallelize``), so that the two cannot disagree.

A unit is what a tower encodes on its own: a frame pair for Qwen2.5-VL (its attention never
crosses one), a frame (or an image crop) for LLaVA-OneVision's SigLIP. Each video's units are cut
into ``cp`` contiguous runs of about equal count, rank ``r`` taking units
``[units * r // cp, units * (r + 1) // cp)``: the rule needs only the video's unit count, which
the video's metadata gives, so a dataset worker can apply it to one sample without knowing the
rest of the batch. All units of a video have the same size, so within a video the runs differ by
at most one unit; a batch of many videos shorter than ``cp`` units leaves the low ranks lighter.
"""


def unit_share(units: int, rank: int, cp: int) -> tuple[int, int]:
    """``(lo, hi)``: the run of a video's ``units`` frame units that cp rank ``rank`` of ``cp``
    encodes (empty when ``lo == hi``); the runs of ranks ``0..cp-1`` tile ``range(units)`` in order."""
    if not 0 <= rank < cp:
        raise ValueError(f"cp rank {rank} is outside 0..{cp - 1}")
    return units * rank // cp, units * (rank + 1) // cp


def frame_share(frames: int, temporal: int, rank: int, cp: int) -> tuple[int, int]:
    """``(lo, hi)``: the frames of a video of ``frames`` sampled frames that cp rank ``rank``
    decodes, when a unit spans ``temporal`` frames (Qwen2.5-VL: 2, the last pair of an odd count
    completed by repeating the last frame; LLaVA-OneVision: 1) (:func:`unit_share` of its
    ``ceil(frames / temporal)`` units)."""
    lo, hi = unit_share(-(-frames // temporal), rank, cp)
    return min(lo * temporal, frames), min(hi * temporal, frames)
