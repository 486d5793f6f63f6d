"""Evaluations split over data-parallel groups (``omnilong/eval/groups.py``): how items are
dealt, progress in a log file, one results file merged from the groups' part files, and the
oracle of the split: the same rows, item for item and in the same file order, from two groups
of one rank, one cp group of two ranks, two groups of two cp ranks and a single process (the
tiny Qwen2.5-VL in fp32; greedy answers compared exactly)."""

import io
import json
import logging
from types import SimpleNamespace

import torch

from omnilong.eval.family import family_for
from omnilong.eval.groups import GroupResults, deal, part_files
from omnilong.eval.niah import run_niah
from omnilong.eval.report import progress
from omnilong.eval.videomme import run_videomme
from omnilong.generation.loading import load_inference_model
from omnilong.testing import python_stdlib_sources
from omnilong.testing.tiny_eval_data import write_tiny_videomme


def test_items_of_a_key_stay_together_and_keys_are_balanced_by_cost():
    videos = ["v0", "v0", "v1", "v1", "v2", "v2", "v3"]
    owner = deal(videos, [1.0] * len(videos), 2)
    for video in set(videos):
        assert len({g for g, v in zip(owner, videos) if v == video}) == 1
    assert owner == [0, 0, 1, 1, 0, 0, 1]  # equal costs: round robin over the keys in first-seen order
    # longest first: the cost-8 item alone, the three others together (loads 8 and 7)
    assert deal(["a", "b", "c", "d"], [1.0, 2.0, 8.0, 4.0], 2) == [1, 1, 0, 1]
    assert deal(["a", "b"], [1.0, 1.0], 1) == [0, 0]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_plain_log_lines_off_a_terminal_and_a_bar_on_one(caplog):
    with caplog.at_level(logging.INFO, logger="omnilong"):
        assert list(progress(range(3), 3, "NIAH", True, interval_s=0, stream=io.StringIO())) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == [
        "NIAH: 1/3 items (33%)",
        "NIAH: 2/3 items (67%)",
        "NIAH: 3/3 items (100%)",
    ]
    assert lines[-1].endswith("0:00:00 left") and "items/s" in lines[-1]
    caplog.clear()
    terminal = _Terminal()
    with caplog.at_level(logging.INFO, logger="omnilong"):
        assert list(progress(range(3), 3, "NIAH", True, stream=terminal)) == [0, 1, 2]
        assert list(progress(range(3), 3, "NIAH", False, stream=_Terminal())) == [0, 1, 2]  # not a writer
    assert "3/3" in terminal.getvalue() and not caplog.records
    with caplog.at_level(logging.INFO, logger="omnilong"):  # several groups: lines even on a terminal
        list(progress(range(2), 2, "V-NIAH [group 1/2]", True, bar=False, interval_s=1e9, stream=_Terminal()))
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["V-NIAH [group 1/2]: 2/2 items (100%)"]


def test_resume_folds_a_stopped_runs_part_files_once(tmp_path):
    """Left by a stopped run of two groups: the results file (row a, and row b, which group 1
    had already merged before the stop) and the part files (group 1's b again and a torn
    line). A resumed run keeps a, b and c once each and deletes the parts; a fresh run empties
    the file."""
    path = tmp_path / "answers.jsonl"
    rows = [{"question_id": q, "response": "A"} for q in "abc"]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n")
    (tmp_path / "answers.jsonl.group0").write_text(json.dumps(rows[2]) + "\n")
    (tmp_path / "answers.jsonl.group1").write_text(json.dumps(rows[1]) + '\n{"question_id": "d", "resp')
    one_process = SimpleNamespace(is_main=True, cp_mesh=None)
    results = GroupResults(one_process, path, resume=True)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    assert part_files(path) == []
    for item in results.run(["d"], "test"):
        results.write({"question_id": item, "response": "B"})
    assert results.finish() == [{"question_id": "d", "response": "B"}]
    assert [json.loads(line)["question_id"] for line in path.read_text().splitlines()] == ["a", "b", "c", "d"]
    GroupResults(one_process, path, resume=False).finish()
    assert path.read_text() == ""


def _evaluate(model_dir, root, out, cp_degree):
    """Video-MME (both subtitle settings) and NIAH with the tiny model in groups of
    ``cp_degree`` ranks (``None``: one process); returns both summaries."""
    loaded = load_inference_model(model_dir, torch.device("cpu"), torch.float32, cp_degree=cp_degree)
    family = family_for("qwen2_5_vl", loaded.tokenizer, loaded.model_dir, max_frames=4)
    videomme = run_videomme(loaded, family, root, out / "videomme", model_dir, max_new_tokens=2)
    niah = run_niah(loaded, family, out / "niah", python_stdlib_sources(3), [96, 128], [0.0, 1.0], 0, 3, needles=1)
    return videomme, niah


def _files(out):
    """The lines of both results files; no part file is left."""
    assert part_files(out / "videomme" / "answers.jsonl") == part_files(out / "niah" / "results.jsonl") == []
    return [(out / name).read_text().splitlines() for name in ("videomme/answers.jsonl", "niah/results.jsonl")]


def _on_ranks(rank, world_size, model_dir, root, out, cp_degrees):
    """Each layout of ``world_size`` ranks, sharing each output folder; rank 0 also reads the files."""
    runs = {}
    for cp in cp_degrees:
        summaries = _evaluate(model_dir, root, out / f"cp{cp}", cp)
        runs[cp] = (_files(out / f"cp{cp}") if rank == 0 else None, summaries)
    return runs


def test_groups_equal_one_cp_group_and_one_process(tiny_qwen_dir, tiny_videos_dir, tmp_path, run_distributed):
    """2 ranks as two groups of one and as one cp group of two; 4 ranks as two groups of two
    (parameters sharded within a group, replicated across: HSDP)."""
    root = write_tiny_videomme(tmp_path / "videomme", tiny_videos_dir, n_videos=3)  # 3 videos, 12 answers
    single = _evaluate(tiny_qwen_dir, root, tmp_path / "single", None)
    files = _files(tmp_path / "single")
    assert len(files[0]) == 12 and len(files[1]) == 4
    for world, cp_degrees in ((2, (1, 2)), (4, (2,))):
        ranks = run_distributed(_on_ranks, world, tiny_qwen_dir, root, tmp_path / f"world{world}", cp_degrees)
        for cp in cp_degrees:
            assert ranks[0][cp][0] == files, (world, cp)  # item for item, in the single process's order
            assert all(rank[cp][1] == single for rank in ranks), (world, cp)  # every rank: the whole summary
