"""``tools/gpu_check.py``, run on CPU in its smoke mode through ``main()``: the table's shape and
files, every check that the CPU allows passing, the CUDA-only ones SKIPPED with the reason, a
failing check reported as FAIL without stopping the others, ``--list``, ``--only``/``--skip``,
the time budget, and the checks' own oracles (the loss reference, the gradient comparison, a
decode check that catches a step missing its newest keys). No timings are asserted."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from omnilong.constants import IGNORE_INDEX

TOOL = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
NEEDS_CUDA = {"offload_peak", "sync_offload", "sync_loss", "liger_16k", "liger_64k"}


def _load_tool():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


gpu_check = _load_tool()
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU stand-ins")


def _run(tmp_path: Path, *args: str) -> tuple[int, dict]:
    code = gpu_check.main(["--smoke", "--out", str(tmp_path), *args])
    return code, json.loads((tmp_path / "gpu_check.json").read_text())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[int, dict, str]:
    """One smoke run of every check: exit status, the JSON and the markdown it wrote."""
    out = tmp_path_factory.mktemp("gpu_check")
    code, data = _run(out)
    return code, data, (out / "gpu_check.md").read_text()


@CPU_ONLY
def test_every_check_has_a_row_in_run_order(smoke_run):
    code, data, markdown = smoke_run
    assert code == 0
    assert [row["check"] for row in data["rows"]] == [check.name for check in gpu_check.CHECKS]
    assert data["environment"]["device"] == "CPU" and data["environment"]["smoke"] is True
    lines = markdown.splitlines()
    assert lines[0].startswith("tools/gpu_check.py on CPU, torch ") and lines[0].endswith(data["summary"])
    assert lines[2] == "| check | status | error | tolerance | time s | wall s | note |"
    assert [line.split(" | ")[0].removeprefix("| ") for line in lines[4:]] == [c.name for c in gpu_check.CHECKS]


@CPU_ONLY
def test_what_the_cpu_allows_passes_and_the_rest_says_why_it_skipped(smoke_run):
    rows = {row["check"]: row for row in smoke_run[1]["rows"]}
    skipped = {name for name, row in rows.items() if row["status"] == "SKIP"}
    assert skipped == NEEDS_CUDA | {"dry_run_peak"}
    for name in NEEDS_CUDA | {"dry_run_peak"}:
        assert rows[name]["note"].startswith("needs CUDA"), rows[name]
    for name, row in rows.items():
        if name not in skipped:
            assert row["status"] == "PASS", row
            assert row["error"] <= row["tolerance"] and row["note"], row


@CPU_ONLY
def test_the_sync_rows_report_what_the_cpu_stand_in_saw(smoke_run):
    """The loss still reads its labels back (``nonzero``); the layers, the ring and a decode
    step do not, on CPU."""
    rows = {row["check"]: row for row in smoke_run[1]["rows"]}
    for name in ("sync_layers", "sync_ring", "sync_decode"):
        assert (rows[name]["error"], rows[name]["tolerance"]) == (0, 0)
        assert "no host sync (CPU stand-in" in rows[name]["note"]
    assert "omnilong/loss/chunked_linear_ce.py" in rows["sync_loss"]["note"]


def test_a_failing_check_is_a_fail_row_and_the_next_checks_run(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("injected failure\nsecond line")

    def out_of_memory(ctx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    checks = {check.name: check for check in gpu_check.CHECKS}
    monkeypatch.setattr(
        gpu_check,
        "CHECKS",
        [
            checks["attn_d80_windows_bf16"],
            gpu_check.Check("broken", broken),
            gpu_check.Check("oom", out_of_memory),
            checks["decode"],
        ],
    )
    code, data = _run(tmp_path)
    assert code == 1
    assert [(row["check"], row["status"]) for row in data["rows"]] == [
        ("attn_d80_windows_bf16", "PASS"),
        ("broken", "FAIL"),
        ("oom", "FAIL"),
        ("decode", "PASS"),
    ]
    broken_row, oom_row = data["rows"][1:3]
    assert broken_row["note"] == "RuntimeError: injected failure"
    assert "second line" in broken_row["traceback"]
    assert oom_row["note"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 80.00 GiB"


def test_a_check_below_its_tolerance_fails_with_its_numbers():
    outcome = gpu_check.Outcome({"out": (0.01, 0.02), "dq": (0.5, 0.02), "host syncs": (0, 0)})
    assert not outcome.passed and outcome.worst() == ("dq", 0.5, 0.02)
    assert gpu_check.Outcome({"host syncs": (0, 0)}).passed
    assert gpu_check.Outcome({"host syncs": (2, 0)}).worst() == ("host syncs", 2, 0)
    assert not gpu_check.Outcome({"out": (float("nan"), 0.02)}).passed


def test_list_names_every_check_with_what_it_does(capsys):
    assert gpu_check.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [check.name for check in gpu_check.CHECKS]
    assert all(len(line.split(maxsplit=1)[1]) > 30 for line in lines)


def test_only_and_skip_take_patterns_and_keep_the_run_order():
    chosen = gpu_check.select(gpu_check.CHECKS, ["loss_16k", "attn_*_bf16"], ["attn_d72*"])
    assert [c.name for c in chosen] == [
        "attn_d128_causal_bf16",
        "attn_d128_docs_bf16",
        "attn_d80_windows_bf16",
        "loss_16k",
    ]
    with pytest.raises(ValueError, match="no check matches 'atn_\\*'"):
        gpu_check.select(gpu_check.CHECKS, ["atn_*"], None)


def test_only_runs_the_chosen_checks(tmp_path):
    code, data = _run(tmp_path, "--only", "loss_16k", "decode")
    assert code == 0 and [(row["check"], row["status"]) for row in data["rows"]] == [
        ("loss_16k", "PASS"),
        ("decode", "PASS"),
    ]


def test_an_unknown_check_name_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--smoke", "--only", "no_such_check"])
    assert exit_info.value.code == 2 and "no check matches 'no_such_check'" in capsys.readouterr().err


def test_checks_left_after_the_budget_are_skipped(tmp_path):
    code, data = _run(tmp_path, "--budget-s", "0", "--only", "attn_*", "loss_*")
    assert code == 0 and len(data["rows"]) == 10
    assert {row["status"] for row in data["rows"]} == {"SKIP"}
    assert all(row["note"].startswith("time budget spent") for row in data["rows"])


@CPU_ONLY
def test_real_shapes_need_a_gpu(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main([])
    assert "--smoke" in capsys.readouterr().err


@CPU_ONLY
def test_an_injected_host_sync_fails_its_sync_row(tmp_path, monkeypatch):
    """A decoder layer that reads a value back: the CPU stand-in names the line."""
    from omnilong.models.blocks import FeedForward

    forward = FeedForward.forward

    def reads_back(self, x):
        x.sum().item()
        return forward(self, x)

    monkeypatch.setattr(FeedForward, "forward", reads_back)
    code, data = _run(tmp_path, "--only", "sync_layers")
    row = data["rows"][0]
    assert code == 1 and row["status"] == "FAIL" and row["error"] >= 2
    assert "tests/test_gpu_check.py" in row["note"] and "aten._local_scalar_dense" in row["note"]


def test_the_decode_check_catches_a_step_missing_its_newest_keys(monkeypatch):
    """The decode check's model attends half its heads to each token's own key, so a decode step
    that leaves out the generated keys fails it (with them, it passes: the smoke run)."""
    import omnilong.generation  # noqa: F401

    kv_cache = sys.modules["omnilong.generation.kv_cache"]
    plan = kv_cache.CachedAttention.plan

    def without_generated_keys(self, input_ids, document_ids):
        steps = plan(self, input_ids, document_ids)
        return steps._replace(generated=None) if isinstance(steps, kv_cache.DecodePlan) else steps

    monkeypatch.setattr(kv_cache.CachedAttention, "plan", without_generated_keys)
    outcome = gpu_check.check_decode(gpu_check.Context(torch.device("cpu"), smoke=True))
    assert not outcome.passed and outcome.errors["logits"][0] > 0.1


def test_the_loss_reference_is_cross_entropy_and_its_gradients():
    """Oracle: ``F.cross_entropy`` of the full logits in fp64 with autograd."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(10, 8, generator=g), torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 30, (10,), generator=g)
    labels[[2, 7]] = IGNORE_INDEX
    loss, d_hidden, d_weight = gpu_check.reference_linear_cross_entropy(hidden, weight, labels, chunk=4)
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected = F.cross_entropy(h @ w.T, labels, ignore_index=IGNORE_INDEX)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(d_hidden.double(), h.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(d_weight.double(), w.grad, atol=1e-6, rtol=0)


def test_gradient_errors_are_relative_and_floored_for_zero_gradients():
    want = {"w": torch.tensor([3.0, 4.0]), "key_bias": torch.tensor([1e-9, 0.0])}
    assert gpu_check.gradient_error({"w": torch.tensor([3.0, 4.5]), "key_bias": torch.zeros(2)}, want) == 0.1
    noisy_zero = {"w": want["w"], "key_bias": torch.tensor([0.0, 1e-4])}
    assert gpu_check.gradient_error(noisy_zero, want) == pytest.approx(1e-4 / 5e-3)


def test_packed_documents_are_contiguous_runs_of_the_asked_number():
    ids = gpu_check.packed_document_ids(2, 100, 7, seed=3)
    assert ids.shape == (2, 100)
    for row in ids:
        assert row[0] == 0 and row[-1] == 6 and bool((row.diff() >= 0).all()) and bool((row.diff() <= 1).all())
