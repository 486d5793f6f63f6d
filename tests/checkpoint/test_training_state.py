"""Crash-safe resume: a run killed with SIGKILL and resumed is the run that never stopped.

Oracle: the same run uninterrupted (CPU, fp32, deterministic): per-step losses and gradient
norms equal and final weights bitwise equal; on a different world size, losses and gradient
norms within 1e-4 relative.
"""

import shutil

import pytest
import torch

from omnilong.checkpoint.dcp_io import load_model_tensors
from tests.recipe_runs import STAGE1, metrics, recipe_run, refused_in_process

pytestmark = pytest.mark.slow

RUN = {
    "max_seq_len": 128,
    "max_steps": 6,
    "dataset.max_files": 20,
    "gradient_accumulation_steps": 1,
    "save_every_n_steps": 2,
    "keep_last_n_checkpoints": 2,
}


def _overrides(tiny_qwen_dir, output_dir=None, **extra):
    placed = {} if output_dir is None else {"output_dir": output_dir}
    return {"checkpoint_dir": tiny_qwen_dir, **placed, **RUN, **extra}


def _run(tiny_qwen_dir, output_dir, nproc=1, **extra):
    return recipe_run(STAGE1, _overrides(tiny_qwen_dir, output_dir, **extra), nproc=nproc)


def _reference(shared_run, tiny_qwen_dir, nproc=1):
    """The output folder of the uninterrupted run (shared by the tests: read only)."""
    return shared_run(STAGE1, _overrides(tiny_qwen_dir), nproc)


def _killed(shared_run, tiny_qwen_dir, to, nproc=1, fault="after_step@3"):
    """A copy at ``to`` (to resume there) of the run killed by the injected ``fault`` (shared)."""
    return shutil.copytree(shared_run(STAGE1, _overrides(tiny_qwen_dir), nproc, fault=fault), to)


def _losses(output_dir):
    """Per-step (loss, gradient norm before clipping): a wrong gradient scale shows in the second."""
    return [(m["loss"], m["grad_norm"]) for m in metrics(output_dir)]


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkilled_run_resumes_to_the_same_losses_and_bitwise_equal_weights(tiny_qwen_dir, shared_run, tmp_path, nproc):
    ref = _reference(shared_run, tiny_qwen_dir, nproc)
    run = _killed(shared_run, tiny_qwen_dir, tmp_path / "run", nproc)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2"]
    resumed = _run(tiny_qwen_dir, run, nproc, resume_from_checkpoint="true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "(step 2, epoch 0" in resumed.stderr
    assert _losses(run) == _losses(ref)
    final, expected = load_model_tensors(run / "checkpoints/step_6"), load_model_tensors(ref / "checkpoints/step_6")
    assert final.keys() == expected.keys() and len(final) > 0
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_4", "step_6"]


def test_crash_while_saving_keeps_the_previous_checkpoint(tiny_qwen_dir, shared_run, tmp_path):
    run = _killed(shared_run, tiny_qwen_dir, tmp_path / "run", fault="during_save@4")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4.tmp"]
    resumed = _run(tiny_qwen_dir, run, resume_from_checkpoint="true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 2, epoch 0" in resumed.stderr
    assert _losses(run) == _losses(_reference(shared_run, tiny_qwen_dir))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_4", "step_6"]


def test_resume_on_a_different_world_size_reshards(tiny_qwen_dir, shared_run, tmp_path):
    """Killed on 2 ranks (1 row each), resumed on 1 rank with 2 accumulation steps: same rows per step."""
    run = _killed(shared_run, tiny_qwen_dir, tmp_path / "run", nproc=2)
    resumed = _run(tiny_qwen_dir, run, nproc=1, resume_from_checkpoint="true", gradient_accumulation_steps=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for a, b in zip(_losses(run), _losses(_reference(shared_run, tiny_qwen_dir, nproc=2)), strict=True):
        assert abs(a[0] - b[0]) <= 1e-4 * abs(b[0]) and abs(a[1] - b[1]) <= 1e-4 * abs(b[1]), (a, b)


@pytest.mark.parametrize("damaged", ["__0_0.distcp", "rng/rank_0.pt"])
def test_damaged_checkpoint_names_the_file_its_sizes_and_the_intact_one(
    tiny_qwen_dir, shared_run, tmp_path, monkeypatch, capsys, damaged
):
    """Checked before any model or data is built, like the export tool does: the recipe's
    constructor refuses it (in this process)."""
    run = shutil.copytree(_reference(shared_run, tiny_qwen_dir), tmp_path / "run")
    step_4, step_6 = run / "checkpoints/step_4", run / "checkpoints/step_6"
    file = step_6 / damaged
    size = file.stat().st_size
    file.write_bytes(file.read_bytes()[:100])
    error = refused_in_process(
        STAGE1, _overrides(tiny_qwen_dir, run, resume_from_checkpoint="true"), monkeypatch, capsys
    )
    expected = "metadata expects" if damaged.endswith(".distcp") else "the save wrote"
    assert f"cannot resume from {step_6}: checkpoint " in error
    assert f" file {file} is truncated: 100 bytes, {expected} " in error
    assert f"the newest intact earlier checkpoint is {step_4}: resume with resume_from_checkpoint={step_4}" in error
    if not damaged.endswith(".distcp"):
        assert f"the save wrote {size}" in error


def test_checkpoint_without_metadata_is_named(tiny_qwen_dir, shared_run, tmp_path, monkeypatch, capsys):
    run = shutil.copytree(_reference(shared_run, tiny_qwen_dir), tmp_path / "run")
    step = run / "checkpoints/step_6"
    (step / ".metadata").unlink()
    error = refused_in_process(
        STAGE1, _overrides(tiny_qwen_dir, run, resume_from_checkpoint=str(step)), monkeypatch, capsys
    )
    assert str(step) in error


def test_run_ends_with_a_hugging_face_export_that_transformers_loads(tiny_qwen_dir, tmp_path):
    """2 steps on 2 processes with save_hf_at_end: transformers loads output_dir/hf with no
    missing or unexpected keys, and its logits equal the native model's with the trained
    weights of the final checkpoint (fp32, 1e-5)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from omnilong.hf_io import read_hf_state_dict
    from omnilong.models import load_hf_model

    result = _run(
        tiny_qwen_dir,
        tmp_path / "run",
        nproc=2,
        max_steps=2,
        save_every_n_steps="null",
        save_hf_at_end="true",
        rope_theta=2_000_000.0,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    hf, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "run/hf", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    native = load_hf_model(tmp_path / "run/hf")  # for the tensors the run did not train (vision tower)
    trained = load_model_tensors(tmp_path / "run/checkpoints/step_2")
    assert set(trained) <= set(native.state_dict())
    native.load_state_dict(trained, strict=False)
    assert native.args.rope_theta == 2_000_000.0
    input_ids = torch.randint(0, native.args.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            native.eval()(input_ids=input_ids), hf.eval()(input_ids=input_ids).logits, atol=1e-5, rtol=0
        )
    base = read_hf_state_dict(tiny_qwen_dir)
    assert not torch.equal(hf.lm_head.weight, base["lm_head.weight"])  # the export holds the trained weights
