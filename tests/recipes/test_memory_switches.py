"""The memory switches through the recipe, on CPU: ``activation_offload`` is accepted and
does nothing there, ``mlp_chunk_size`` chunks each layer's norm + MLP, ``cpu_threads_per_rank``
sets the rank's CPU threads.

Oracle: the same run without the switches; per-step losses and gradient norms within 1e-5
relative (chunking reorders no sum: each token's MLP is computed alone either way).
"""

import pytest
from omegaconf import OmegaConf

from omnilong.config import validate_config
from tests.recipe_runs import SMALL_STAGE1, STAGE1, metrics, recipe_run


@pytest.mark.slow
def test_activation_offload_and_mlp_chunks_train_like_the_plain_run(tiny_qwen_dir, shared_run, tmp_path):
    """The plain run is shared with other tests."""
    small = {"checkpoint_dir": tiny_qwen_dir, **SMALL_STAGE1}
    switched = recipe_run(
        STAGE1,
        {
            **small,
            "output_dir": tmp_path / "switched",
            "activation_offload": "true",
            "mlp_chunk_size": 48,
            "save_hf_at_end": "false",  # 128 tokens: chunks of 48, 48, 32
            "cpu_threads_per_rank": 1,
        },
    )
    assert switched.returncode == 0, switched.stderr[-3000:]
    assert "CPU threads per rank: 1 (cpu_threads_per_rank)" in switched.stderr
    plain = shared_run(STAGE1, small)
    for a, b in zip(metrics(plain), metrics(tmp_path / "switched"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * abs(a["grad_norm"]), (a, b)


def test_bad_switch_values_are_named_before_any_work():
    cfg = OmegaConf.load(STAGE1)
    cfg.mlp_chunk_size, cfg.activation_offload, cfg.cpu_threads_per_rank = 0, "yes", 0
    with pytest.raises(ValueError) as error:
        validate_config(cfg)
    assert "mlp_chunk_size must be a positive number of tokens or null, got 0" in str(error.value)
    assert "activation_offload must be true or false, got 'yes'" in str(error.value)
    assert "cpu_threads_per_rank must be a positive integer or null, got 0" in str(error.value)
