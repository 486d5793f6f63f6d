"""MetricsWriter on a terminal (a progress bar) and in a file (plain lines), and its end-of-run summary."""

import io
import json
import logging
import sys

from omnilong.metrics import MetricsWriter


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _metrics(step):
    return {
        "loss": 2.0 / step,
        "lr": 1e-4,
        "grad_norm": 0.5,
        "num_tokens": 100,
        "tokens_per_sec": 1234.5,
        "peak_memory_gb": 1.25,
        "num_skipped": 0,
    }


def _train(writer, steps, log_every):
    for step in range(1, steps + 1):
        writer.step_done(input_tokens=128)
        if step % log_every == 0:
            writer.log(step, _metrics(step))


def test_in_a_file_each_logged_step_is_one_plain_line_and_no_bar(tmp_path, caplog):
    stream = io.StringIO()
    writer = MetricsWriter(tmp_path, total_steps=4, active=True, stream=stream)
    with caplog.at_level(logging.INFO, logger="omnilong"):
        _train(writer, 4, log_every=2)
        writer.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "step 2/4: loss 1.0000, lr 1.00e-04, grad_norm 0.5000, tokens_per_sec 1234, peak_memory_gb 1.25, num_skipped 0",
        "step 4/4: loss 0.5000, lr 1.00e-04, grad_norm 0.5000, tokens_per_sec 1234, peak_memory_gb 1.25, num_skipped 0",
    ]
    assert stream.getvalue() == ""
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]


def test_on_a_terminal_the_bar_advances_every_step_and_log_records_print_above_it(tmp_path, monkeypatch):
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    handler = logging.StreamHandler(sys.stderr)  # as logging.basicConfig makes it
    logging.root.addHandler(handler)
    try:
        writer = MetricsWriter(tmp_path, total_steps=5, active=True, steps_done=1, stream=stream)
        _train(writer, 3, log_every=2)
        assert writer.bar.n == 4  # resumed after step 1, then 3 steps, though only one was logged
        logging.getLogger("omnilong").warning("a record while the bar is shown")
        writer.close()
    finally:
        logging.root.removeHandler(handler)
    out = stream.getvalue()
    assert "\na record while the bar is shown\n" in out.replace("\r", "\n")  # a line of its own
    assert "4/5" in out and "loss=1.0000" in out
    assert logging.root.handlers[-1] is not handler  # the redirection to the bar is undone


def test_other_ranks_write_nothing(tmp_path):
    writer = MetricsWriter(tmp_path, total_steps=2, active=False, stream=_Terminal())
    _train(writer, 2, log_every=1)
    writer.close()
    assert writer.bar is None and not (tmp_path / "metrics.jsonl").exists()


def test_summary_names_final_losses_and_where_the_outputs_are(tmp_path, caplog):
    writer = MetricsWriter(tmp_path, total_steps=2, active=True, stream=io.StringIO())
    with caplog.at_level(logging.INFO, logger="omnilong"):
        writer.log(2, {**_metrics(2), "val_loss": 0.75})
        writer.summary(2, tmp_path / "checkpoints" / "step_2", None)
    text = caplog.records[-1].getMessage()
    assert text.startswith("done: 2 steps in ")
    assert "final loss: 1.0000" in text and "final val_loss: 0.7500" in text
    assert f"last checkpoint: {tmp_path / 'checkpoints' / 'step_2'}" in text
    assert "Hugging Face export: none (save_hf_at_end is false)" in text
    assert f"metrics: {tmp_path / 'metrics.jsonl'}" in text
