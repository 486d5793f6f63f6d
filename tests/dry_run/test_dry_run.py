"""The dry run: the recipe's real setup and steps on fake tensors, checked against a real run
of the same config, and every shipped 7B config dry-run at the world size of its command (docs/training.md)."""

import os
import traceback

import pytest

from omnilong.memory_plan import GiB, ModelShape, RunSetup, plan
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


@pytest.mark.parametrize(
    "override, world_size", [("cp_degree=2", 1), ("dataset.not_an_argument=1", 1), ("max_seq_len=0", 1)]
)
def test_a_config_that_cannot_run_fails_in_the_dry_run_as_it_does_for_real(
    tiny_qwen_dir, tmp_path, override, world_size
):
    overrides = [f"checkpoint_dir={tiny_qwen_dir}", f"output_dir={tmp_path}/run", override]
    real = _forked_omnilong(["run", "--config", STAGE1, *overrides], dict(os.environ), tmp_path, 300)
    dry = _forked_omnilong(
        ["run", "--config", STAGE1, "--dry-run", "--world-size", str(world_size), *overrides],
        dict(os.environ),
        tmp_path,
        300,
    )
    error = [line for line in real.stderr.splitlines() if line.startswith("omnilong_full: error:")]
    assert real.returncode == dry.returncode == 1 and len(error) == 1, real.stderr
    assert error[0] in dry.stderr.splitlines(), dry.stderr


@pytest.mark.slow
@pytest.mark.parametrize("config", SHIPPED_7B)
def test_every_shipped_7b_config_fits_an_80_gb_gpu_on_the_world_size_of_its_readme_command(config, tmp_path):
    """The command in docs/training.md for each 7B config is on one node of 8 GPUs. The dry run needs
    neither the checkpoint nor the data (the config's shapes are the shipped model's), and
    writes nothing. The memory planner (``tools/plan_memory.py``) agrees with it within 10%
    on the text stages."""
    run = _forked_omnilong(
        ["run", "--nproc_per_node", "8", "--config", config, "--dry-run", "--gpu", "h100", "--no-longest"],
        env=dict(os.environ),
        cwd=tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "fits a H100 80 GB" in run.stdout and run.stdout.rstrip().endswith("yes"), run.stdout
    assert "shipped with OmniLong" in run.stdout
    assert list(tmp_path.iterdir()) == []
    if "video" not in config:  # the planner does not model the vision tower: the dry run is the answer there
        total = next(line for line in run.stdout.splitlines() if line.strip().startswith("total"))
        dry_run_peak = float(total.split()[1]) * GiB
        assert abs(_planned_peak(config) - dry_run_peak) <= 0.10 * dry_run_peak, (_planned_peak(config), dry_run_peak)


def _planned_peak(config: str) -> int:
    """``tools/plan_memory.py``'s peak for ``config`` on 8 GPUs (:mod:`omnilong.memory_plan`)."""
    import torch

    from omnilong.config import validate_config
    from omnilong.config_files import load_config, resolve_config
    from omnilong.dry_run.report import SHIPPED_MODELS
    from omnilong.models.hf_loading import build_model_from_hf_config
    from omnilong.models.named import named_model_config

    cfg = validate_config(load_config(resolve_config(config), []))
    with torch.device("meta"):
        model = build_model_from_hf_config(named_model_config(SHIPPED_MODELS[config.split("/")[0]]))
    return plan(ModelShape.of(model, cfg.freeze_vision), RunSetup.from_config(cfg, 8))["peak"]


def _made_up_run_losses(config: str, overrides: list[str], queue) -> None:
    try:
        import omnilong_full
        from omnilong.config_files import load_config
        from omnilong.dry_run import DryRunSettings

        cfg = load_config(config, overrides)
        recipe = omnilong_full.MadeUpRun(cfg, DryRunSettings(1))
        recipe.setup()
        batches = recipe._batches()
        losses = [float(recipe._train_step([next(batches)])[0]) for _ in range(3)]
        recipe.cleanup()
        queue.put(losses)
    except BaseException:
        queue.put(traceback.format_exc())


def test_the_made_up_run_the_gpu_check_measures_trains_for_real(tiny_qwen_dir, tmp_path):
    """``MadeUpRun``, what ``tools/gpu_check.py`` runs on a GPU to compare with the dry run, on
    this CPU: real steps on made-up rows and untrained weights, writing nothing."""
    overrides = [f"checkpoint_dir={tiny_qwen_dir}", f"output_dir={tmp_path}/run", "max_seq_len=256"]
    ctx = fork_server_context()
    queue = ctx.Queue()
    child = ctx.Process(target=_made_up_run_losses, args=(STAGE1, overrides, queue))
    child.start()
    losses = queue.get(timeout=300)
    child.join()
    assert not isinstance(losses, str), losses
    assert len(losses) == 3 and all(0 < loss < 1e6 for loss in losses), losses
    assert not (tmp_path / "run").exists()
