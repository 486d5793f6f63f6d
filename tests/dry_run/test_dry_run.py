"""The dry run: the recipe's real setup and steps on fake tensors, checked against a real run
of the same config, and every shipped 7B config dry-run at its README world size."""

import traceback

import pytest

from tests.fork_server import fork_server_context
from tests.recipe_runs import STAGE1, _forked_omnilong

SHIPPED_7B = [
    f"{family}/{stage}"
    for family in ("qwen2_5_vl_7b", "llava_ov_7b")
    for stage in ("stage1_text", "stage2_text_sft", "stage3_video_sft")
]


def _traced_peaks(dry: bool, config: str, overrides: list[str], queue) -> None:
    """In a forked process: the memory tracker's device peak of each of two training steps of
    ``config``, run for real on this CPU (one rank) or as a dry run on fake tensors; the same
    tracker and the same traced steps (``omnilong_full.TracedSteps``) in both."""
    try:
        queue.put(_traced_step_peaks(dry, config, overrides))
    except BaseException:
        queue.put(traceback.format_exc())


def _traced_step_peaks(dry: bool, config: str, overrides: list[str]) -> list[dict[str, int]]:
    import omnilong_full
    from omnilong.config_files import load_config
    from omnilong.dry_run import DeviceMemoryTracker, DryRunSettings, fake_tensors

    cfg = load_config(config, overrides)
    if dry:
        with fake_tensors("cpu"):
            recipe = omnilong_full.DryRunRecipe(cfg, DryRunSettings(1, longest=False))
            recipe.setup()
            report = recipe.train()
        return [step.device for step in report.steps]

    class TracedRecipe(omnilong_full.TracedSteps, omnilong_full.OmniLongFullRecipe):
        pass

    recipe = TracedRecipe(cfg)
    recipe.setup()
    recipe.tracker = DeviceMemoryTracker(recipe.model, recipe.optimizer, cfg.fsdp_cpu_offload)
    recipe.tracker.tag_module(recipe.loss_fn, "loss")
    batches = recipe._batches()
    with recipe.tracker:
        peaks = [
            recipe._traced_step([next(batches) for _ in range(cfg.gradient_accumulation_steps)]).device
            for _ in range(2)
        ]
    recipe.cleanup()
    return peaks


def _peaks(dry: bool, config: str, overrides: list[str]) -> list[dict[str, int]]:
    ctx = fork_server_context()
    queue = ctx.Queue()
    child = ctx.Process(target=_traced_peaks, args=(dry, config, overrides, queue))
    child.start()
    peaks = queue.get(timeout=300)
    child.join()
    assert not isinstance(peaks, str), peaks
    return peaks


@pytest.mark.slow
def test_a_dry_run_and_a_real_run_of_the_tiny_config_agree_on_the_memory_trackers_peak(tiny_qwen_dir, tmp_path):
    overrides = [f"checkpoint_dir={tiny_qwen_dir}", f"output_dir={tmp_path}/run", "max_seq_len=512", "max_steps=2"]
    real, dry = _peaks(False, STAGE1, overrides), _peaks(True, STAGE1, overrides)
    for real_step, dry_step in zip(real, dry):
        assert abs(sum(dry_step.values()) - sum(real_step.values())) <= 0.02 * sum(real_step.values()), (real, dry)
        for category in ("parameters", "gradients", "optimizer state", "loss"):
            assert dry_step[category] == real_step[category], (category, real_step, dry_step)


@pytest.mark.slow
@pytest.mark.parametrize("config", SHIPPED_7B)
def test_every_shipped_7b_config_fits_an_80_gb_gpu_on_the_world_size_of_its_readme_command(config):
    """The README's command for each 7B config is on one node of 8 GPUs."""
    run = _forked_omnilong(
        ["run", "--nproc_per_node", "8", "--config", config, "--dry-run", "--gpu", "h100", "--no-longest"],
        env=None,
        cwd=".",
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "fits a H100 80 GB" in run.stdout and run.stdout.rstrip().endswith("yes"), run.stdout
