"""The loss of a step is the sum of its token losses over every micro-batch and rank divided by
the number of trained tokens of the whole step: checked against an independent computation.

Chat rows of different lengths, some with no assistant turn, so micro-batches and ranks train
different numbers of tokens (rank 1 trains none in step 1 of the data-parallel run). Plain SGD
without clipping or schedule: the run's weights after step 1 are ``w - lr * grad``, which the
test computes too.

Oracle: the same rows through the native model loaded with ``load_hf_model`` in this process,
one unpadded row at a time (no padding, sharding, FSDP or chunked loss): ``sum(token losses) /
count``, its gradient and that gradient's norm, then one SGD step by hand for step 2.
Tolerance: 1e-4 relative on the loss and the gradient norm of both steps (fp32).
"""

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from omnilong.data import chat_dataset, load_tokenizer
from omnilong.models import load_hf_model
from tests.recipe_runs import STAGE2, metrics, recipe_run

pytestmark = pytest.mark.slow

LR = 0.5


def _chat(*turns):
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": role, "content": text} for role, text in zip(roles, turns)]}


# Row i goes to dp rank i % 2; every odd row of step 1 (rows 0-7) has nothing to train.
ROWS = [
    _chat("What is a list?", "A mutable sequence of items, written in square brackets, that can grow and shrink."),
    _chat("hello there, this turn has no answer"),
    _chat("Hi", "Hello"),
    _chat("and neither has this one"),
    _chat("What does len do?", "It returns the number of items in a container."),
    _chat("nothing to learn here either, just a question that is rather long for a row"),
    _chat("Name a loop.", "for", "Another one?", "while, which repeats as long as its condition holds true."),
    _chat("a last row without an answer"),
    _chat("Yes?", "No."),
    _chat("What is a tuple?", "An immutable sequence."),
    _chat("What is a dict?", "A mapping from hashable keys to values, kept in insertion order."),
]

# Rows of each step for each layout (shuffle off; 11 rows).
LAYOUTS = {
    # 2 dp ranks x 2 rows x 2 micro-batches. The sampler pads the epoch to 12 with row 0; rank 0
    # takes positions 0, 2, 4..., rank 1 positions 1, 3, 5...; step 2 runs into epoch 1.
    "dp2_accumulation2": (
        {"batch_size": 2, "gradient_accumulation_steps": 2},
        [[0, 1, 2, 3, 4, 5, 6, 7], [8, 10, 9, 0, 0, 2, 1, 3]],
    ),
    # 2 cp ranks, padded batches of 4 rows, 2 micro-batches: step 2 starts with the uneven last
    # batch of the epoch (rows 8-10) and goes on with epoch 1's first batch.
    "cp2_padded_rows": (
        {"cp_degree": 2, "batch_size": 4, "gradient_accumulation_steps": 2},
        [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 0, 1, 2, 3]],
    ),
}


def _oracle(checkpoint_dir, rows, steps):
    """Per step: (loss, gradient norm, trained tokens) of one process over ``rows``, then SGD."""
    model = load_hf_model(checkpoint_dir)
    trained = [p for p in model.parameters() if p.requires_grad]
    expected = []
    for step_rows in steps:
        losses = [
            F.cross_entropy(model(input_ids=rows[i]["input_ids"][None])[0], rows[i]["labels"], reduction="sum")
            for i in step_rows
        ]
        count = sum(int((rows[i]["labels"] != -100).sum()) for i in step_rows)
        loss = torch.stack(losses).sum() / count
        grads = torch.autograd.grad(loss, trained, allow_unused=True)
        loss = loss.detach()
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None]))
        expected.append((loss.item(), norm.item(), count))
        with torch.no_grad():
            for p, g in zip(trained, grads):
                if g is not None:
                    p -= LR * g
    return expected


@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_loss_and_gradient_are_normalized_by_the_global_token_count(tiny_qwen_dir, tmp_path, layout):
    overrides, steps = LAYOUTS[layout]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    config = OmegaConf.load(STAGE2)
    config.pop("lr_scheduler")  # a CLI override cannot remove a component
    config.optimizer = {"_component_": "torch.optim.SGD", "lr": LR}
    OmegaConf.save(config, tmp_path / "sgd.yaml")
    run = {
        "checkpoint_dir": tiny_qwen_dir,
        "output_dir": tmp_path / "out",
        "max_steps": 2,
        "shuffle": "false",
        "dataset._component_": "omnilong.data.chat_dataset",
        "~dataset.max_files": None,
        "dataset.data_files": f"[{data}]",
        "dataset.packed": "false",
        "clip_grad_norm": "null",
        **overrides,
    }
    result = recipe_run(str(tmp_path / "sgd.yaml"), run, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]

    rows = chat_dataset(load_tokenizer(tiny_qwen_dir), [data], max_seq_len=512, packed=False)
    assert len(rows) == len(ROWS)
    tokens = [int((rows[i]["labels"] != -100).sum()) for i in range(len(ROWS))]
    assert tokens[1:8:2] == [0, 0, 0, 0] and len(set(tokens[0:8:2])) == 4  # the premise of the test
    expected = _oracle(tiny_qwen_dir, rows, steps)
    got = metrics(tmp_path / "out")
    assert [m["step"] for m in got] == [1, 2]
    for m, (loss, norm, count) in zip(got, expected):
        assert m["num_tokens"] == count
        assert abs(m["loss"] - loss) <= 1e-4 * loss, (m, loss)
        assert abs(m["grad_norm"] - norm) <= 1e-4 * norm, (m, norm)
