"""Validation loss and what a run writes to a log file, on a real 2-process run (gloo, CPU)."""

import re

import pytest
import torch
import torch.nn.functional as F

from omnilong.constants import IGNORE_INDEX
from omnilong.data import load_tokenizer
from omnilong.data.packed_text import PackedTextDataset
from omnilong.models.hf_loading import load_hf_model
from tests.recipe_runs import STAGE1, metrics, recipe_run

pytestmark = pytest.mark.slow

SEQ_LEN = 48


def _held_out_files(tmp_path) -> list[str]:
    """Three small text files, an odd number of rows (one of 2 dp ranks gets a padded copy), and
    an empty one (every rank's dataset warns about it)."""
    texts = [
        "def add(a, b):\n    return a + b\n" * 3,
        "import os\nprint(os.getcwd())\n" * 2,
        "class Point:\n    x: int = 0\n    y: int = 0\n" * 2,
        "",
    ]
    paths = []
    for i, text in enumerate(texts):
        path = tmp_path / f"held_out_{i}.py"
        path.write_text(text)
        paths.append(str(path))
    return paths


def _oracle_val_loss(model_dir, files) -> tuple[float, int]:
    """Summed cross-entropy of full logits (``F.cross_entropy``) of every row of the split, one
    row at a time on one process, / the count of non-ignored labels."""
    model = load_hf_model(model_dir).eval()
    dataset = PackedTextDataset(load_tokenizer(model_dir), files, SEQ_LEN, separator_token="<|endoftext|>")
    loss, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            row = {k: v[None] for k, v in dataset[i].items()}
            labels = row.pop("labels")
            logits = model(**row)
            loss += float(
                F.cross_entropy(
                    logits.flatten(0, 1).double(), labels.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
                )
            )
            tokens += int((labels != IGNORE_INDEX).sum())
    return loss / tokens, tokens, len(dataset)


def test_val_loss_under_two_dp_ranks_matches_a_one_process_oracle_and_the_log_reads_well(tiny_qwen_dir, tmp_path):
    """Oracle: the final weights (the run's HF export) evaluated directly on the split; within 1e-5
    relative (fp32). The split has an odd number of rows over 2 dp ranks: the padded copy must
    not count. stderr (a file here, not a terminal) has one plain line per logged step from
    rank 0 only, no progress bar, and an end-of-run summary."""
    files = _held_out_files(tmp_path)
    out = tmp_path / "out"
    result = recipe_run(
        STAGE1,
        {
            "checkpoint_dir": tiny_qwen_dir,
            "output_dir": out,
            "max_seq_len": SEQ_LEN,
            "max_steps": 3,
            "dataset.max_files": 10,
            "shuffle": "false",
            "log_every_n_steps": 2,
            "eval_every_n_steps": 2,
            "save_hf_at_end": "true",
            "validation_dataset": "{{_component_: omnilong.data.PackedTextDataset, data_files: [{}], "
            "separator_token: '<|endoftext|>'}}".format(",".join(files)),
        },
        nproc=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    records = metrics(out)
    assert [r["step"] for r in records] == [2, 3]  # every 2nd step and the last
    assert all("val_loss" in r and "val_tokens" in r for r in records)
    expected, tokens, rows = _oracle_val_loss(out / "hf", files)
    assert rows % 2 == 1
    final = records[-1]
    assert final["val_tokens"] == tokens
    assert abs(final["val_loss"] - expected) <= 1e-5 * expected, (final["val_loss"], expected)

    log = result.stderr
    step_lines = re.findall(
        r"^.*omnilong INFO: step (\d)/3: loss [\d.]+, val_loss [\d.]+, lr .*tokens_per_sec \d+.*$", log, re.MULTILINE
    )
    assert step_lines == ["2", "3"], log[-3000:]
    assert "it/s" not in log and "\r" not in log  # no tqdm bar in a file
    assert log.count("omnilong INFO: data:") == 1  # rank 1 logs no INFO
    assert log.count("skipped 1 empty documents") == 1  # rank 1's dataset warns too, silently
    summary = log[log.index("omnilong INFO: done: 3 steps") :]
    assert f"final val_loss: {final['val_loss']:.4f}" in summary
    assert f"last checkpoint: {out / 'checkpoints' / 'step_3'}" in summary
    assert f"Hugging Face export: {out / 'hf'}" in summary and f"metrics: {out / 'metrics.jsonl'}" in summary
