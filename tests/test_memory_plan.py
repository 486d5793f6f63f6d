"""The memory planner (``omnilong.memory_plan``, ``tools/plan_memory.py``).

Oracle for the prediction: the measured resident-set peak of a real training step of a
small model on CPU (fp32, one process without FSDP, activation checkpointing, chunked loss,
fused AdamW), in a fresh process; tolerance 15%.
"""

import sys
from dataclasses import replace

import pytest
import torch

from omnilong.memory_plan import GiB, ModelShape, RunSetup, longest_seq_len, plan
from omnilong.models import qwen2_5_vl_7b
from tests.recipe_runs import REPO

sys.path.insert(0, str(REPO / "tools"))
from plan_memory import measure_cpu_in_subprocess, model_shape  # noqa: E402

SMALL = dict(vocab_size=4096, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=1024, mrope_section=[8, 12, 12])


@pytest.mark.slow
@pytest.mark.parametrize("mlp_chunk_size", [None, 256])
def test_predicted_peak_is_within_15_percent_of_the_measured_cpu_peak(mlp_chunk_size):
    result = measure_cpu_in_subprocess(SMALL, 2048, mlp_chunk_size)
    assert abs(result["predicted"] / result["measured"] - 1) <= 0.15, result


@pytest.fixture(scope="module")
def shape_7b() -> ModelShape:
    with torch.device("meta"):
        return ModelShape.of(qwen2_5_vl_7b())


def test_7b_shape_is_read_off_the_model(shape_7b):
    assert (shape_7b.n_layers, shape_7b.dim, shape_7b.kv_dim, shape_7b.hidden_dim) == (28, 3584, 512, 18944)
    assert 8.2e9 < shape_7b.params < 8.4e9  # 7.6B language model + 0.68B vision tower
    assert shape_7b.params - shape_7b.trained_params == 676_550_144  # the frozen vision tower


def test_each_switch_lowers_its_own_component(shape_7b):
    base = RunSetup(seq_len=65536, gpus=8)
    plain = plan(shape_7b, base)
    offloaded = plan(shape_7b, replace(base, fsdp_cpu_offload=True))
    assert offloaded["optimizer"] == 0 and offloaded["parameters"] < plain["parameters"]
    assert (
        plan(shape_7b, replace(base, activation_offload=True))["saved_activations"] < plain["saved_activations"] / 4
    )  # 2 of 28 layer inputs
    assert plan(shape_7b, replace(base, mlp_chunk_size=4096))["layer_recompute"] < plain["layer_recompute"] / 2
    halved = plan(shape_7b, replace(base, cp=2))  # each GPU holds half the tokens
    assert halved["saved_activations"] == pytest.approx(plain["saved_activations"] / 2, rel=1e-3)


def test_longest_seq_len_is_the_last_that_fits(shape_7b):
    run = RunSetup(seq_len=1, gpus=8, mlp_chunk_size=4096)
    memory = 74 * GiB
    longest = longest_seq_len(shape_7b, run, memory)
    assert plan(shape_7b, replace(run, seq_len=longest))["peak"] <= memory
    assert plan(shape_7b, replace(run, seq_len=longest + 1024))["peak"] > memory
    assert longest_seq_len(shape_7b, run, 1 * GiB) == 0


def test_degrees_that_do_not_divide_the_gpus_are_refused(shape_7b):
    with pytest.raises(ValueError, match="gpus 8 must be a multiple of dp_replicate \\* cp = 3"):
        plan(shape_7b, RunSetup(seq_len=1024, gpus=8, cp=3))


def test_shape_of_a_checkpoint_directory_and_a_bad_name(tiny_qwen_dir):
    from omnilong.hf_io import read_hf_config

    config = read_hf_config(tiny_qwen_dir)
    text = config.get("text_config", config)
    shape = model_shape(str(tiny_qwen_dir))
    assert (shape.dim, shape.n_layers, shape.vocab_size) == (
        text["hidden_size"],
        text["num_hidden_layers"],
        text["vocab_size"],
    )
    with pytest.raises(SystemExit, match="neither a checkpoint directory nor a known name"):
        model_shape("/nonexistent/model")
