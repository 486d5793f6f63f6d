"""The dry run's pieces: the fake world, the FLOP formula of causal attention, the made-up rows,
the shipped model shapes, the report's arithmetic and the launcher's world size."""

import pytest
import torch
from omegaconf import OmegaConf
from torch._subclasses.fake_tensor import FakeTensor

from omnilong.cli import _torchrun_world_size
from omnilong.constants import IGNORE_INDEX
from omnilong.data.video import num_video_tokens
from omnilong.dry_run import DryRunReport, DryRunSettings, LoaderMemory, MadeUpRows, StepRecord, fake_tensors
from omnilong.dry_run.flops import flash_attention_flops, visible_pairs
from omnilong.dry_run.report import WORKER_BASELINE_BYTES
from omnilong.kernel_device import kernel_device_type
from omnilong.memory_plan import GPUS, GiB
from omnilong.models.hf_loading import build_model_from_hf_config
from omnilong.models.named import named_model_config
from tests.recipe_runs import REPO


@pytest.mark.parametrize("q_len, k_len", [(5, 5), (3, 7), (7, 3), (1, 4), (6, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_visible_pairs_count_the_flash_kernels_mask(q_len, k_len, causal):
    """Oracle: the mask itself (causal aligned to the bottom right, as flash attention's)."""
    mask = torch.ones(q_len, k_len, dtype=torch.bool)
    if causal:
        mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=k_len - q_len)
    assert visible_pairs(q_len, k_len, causal) == int(mask.sum())


def test_flash_flops_sum_the_segments():
    query = torch.empty(10, 4, 8)  # 10 tokens, 4 heads, head dim 8
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)  # segments of 4 and 6 tokens
    assert flash_attention_flops(query, cu, cu, causal=True) == 4 * 4 * 8 * (10 + 21)


def test_fake_world_runs_what_the_host_reads_for_real_and_fakes_the_rest():
    with fake_tensors("cuda"):
        ids = torch.tensor([3, 1, 2])  # real data stays real: the host may read it
        assert not isinstance(ids, FakeTensor) and ids.sort().values.tolist() == [1, 2, 3]
        offsets = torch.arange(4)  # small integer factories too (a mesh, cumulative lengths)
        assert not isinstance(offsets, FakeTensor)
        weight = torch.empty(1 << 20, 4096)  # 16 GiB of floats: fake, no memory
        assert isinstance(weight, FakeTensor) and isinstance(weight[ids], FakeTensor)
        assert kernel_device_type(weight) == "cuda" and kernel_device_type(ids) == "cpu"
    assert kernel_device_type(weight) == "cpu"


@pytest.mark.parametrize("name, parameters", [("qwen2.5-vl-7b", 8_292_166_656), ("llava-onevision-7b", 8_030_807_584)])
def test_the_shipped_model_shapes_have_the_published_parameter_counts(name, parameters):
    with torch.device("meta"):
        model = build_model_from_hf_config(named_model_config(name))
    assert sum(p.numel() for p in model.parameters()) == parameters


def _stage3(path: str) -> OmegaConf:
    return OmegaConf.load(REPO / "configs" / f"{path}.yaml").dataset


def test_made_up_video_rows_have_the_vision_tokens_the_dataset_would_give():
    config = named_model_config("qwen2.5-vl-7b")
    rows = MadeUpRows(_stage3("qwen2_5_vl_7b/stage3_video_sft"), 131072, config)
    row = rows[0]
    # 768 frames of 1280x720 under the 90,316,800-pixel budget: 336 x 588 (multiples of 28)
    tokens = num_video_tokens(768, 336, 588)
    assert rows.video["tokens"] == tokens == 96768
    ids, labels = row["input_ids"], row["labels"]
    assert ids.shape == (131072,) and int((ids == config["video_token_id"]).sum()) == tokens
    assert row["video_grid_thw"].tolist() == [[384, 24, 42]] and row["pixel_values_videos"].shape == (
        384 * 24 * 42,
        1176,
    )
    assert row["pixel_values_videos"].dtype == torch.uint8  # as the dataset's items: normalised on the device
    end = int((ids == config["vision_end_token_id"]).nonzero())
    assert (labels[:end] == IGNORE_INDEX).all() and (labels[end:-1] != IGNORE_INDEX).all()

    llava = MadeUpRows(_stage3("llava_ov_7b/stage3_video_sft"), 131072, named_model_config("llava-onevision-7b"))
    assert llava.video["tokens"] == 512 * 196 + 1 and llava[0]["pixel_values_videos"].shape == (512, 3, 384, 384)


def test_the_loader_workers_hold_their_prefetched_batches_and_their_imports():
    """A rank's loader: workers x (prefetch x batch bytes + a worker's measured baseline); the
    made-up LLaVA row's bytes are its cp share's uint8 frames and its five int64/bool token rows."""
    rows = MadeUpRows(_stage3("llava_ov_7b/stage3_video_sft"), 131072, named_model_config("llava-onevision-7b"))
    rows.decode_cp_share(0, 4)
    tokens = 131072 * 8 * 3 + 8 + 1  # input_ids, labels, document_ids; video_num_frames; skipped
    assert rows.row_bytes() == 128 * 3 * 384 * 384 + tokens
    loader = LoaderMemory(workers=4, prefetch=2, batch_bytes=rows.row_bytes())
    assert loader.total == 4 * (2 * rows.row_bytes() + WORKER_BASELINE_BYTES)
    assert loader.format() == (
        "host memory per rank of the data loader: 1.99 GiB = 4 workers x (2 batches ahead x 0.06 GiB "
        "+ 0.39 GiB of a worker's imports, measured)"
    )
    report = DryRunReport("c", DryRunSettings(world_size=8), "m", "mesh", "rows", 1, loader=loader)
    report.steps.append(StepRecord(tokens=1, device={"params": 1}, host={}, flops=1, seconds=0.0))
    assert loader.format() in report.format().splitlines()


def test_a_video_longer_than_the_rows_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match="96,768 vision tokens, more than max_seq_len 65,536: raise max_seq_len"):
        MadeUpRows(_stage3("qwen2_5_vl_7b/stage3_video_sft"), 65536, named_model_config("qwen2.5-vl-7b"))


def test_the_longest_length_extrapolates_the_two_peaks_linearly():
    settings = DryRunSettings(8, GPUS["h100"])
    report = DryRunReport("c", settings, "m", "mesh", "rows", tokens_per_step=8 * 65536, max_seq_len=65536)
    report.steps.append(StepRecord(65536, {"activations": 30 * GiB}, {}, 0, 0.0))
    report.shorter = StepRecord(32768, {"activations": 20 * GiB}, {}, 0, 0.0)
    # 10 GiB per 32K tokens above 10 GiB: the usable 73.6 GiB hold 63.6 / 10 * 32K tokens
    assert report.longest_seq_len() == int(63.6 / 10 * 32768) // 1024 * 1024
    assert report.fits


@pytest.mark.parametrize(
    "options, ranks", [(["--nproc_per_node", "8"], 8), (["--nproc-per-node=4", "--nnodes", "2:4"], 16), ([], 1)]
)
def test_the_dry_run_plans_for_the_ranks_torchrun_would_start(options, ranks):
    assert _torchrun_world_size(options) == ranks


def test_a_dry_run_cannot_count_the_gpus_of_another_machine():
    with pytest.raises(ValueError, match="needs numbers for --nproc_per_node"):
        _torchrun_world_size(["--nproc_per_node", "gpu"])
