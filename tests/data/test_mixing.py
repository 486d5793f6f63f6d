"""Weighted mixing: an epoch of M = (sum of source rows) rows, source i gives round(M * w_i)
of them (largest remainder), spread evenly over its rows; no RNG, so resume keeps the order."""

from collections import Counter

import pytest

from omnilong.data import WeightedMix, load_tokenizer, prepared_text_dataset
from omnilong.data.mixing import rows_per_source
from omnilong.data.prepare import prepare
from omnilong.data.sampler import ResumableDistributedSampler


class _Rows:
    """A stand-in dataset: row ``i`` of source ``name`` is ``(name, i)``."""

    def __init__(self, name, size, pad_id=0):
        self.name, self.size, self.pad_id = name, size, pad_id

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        if not 0 <= i < self.size:
            raise IndexError(i)
        return self.name, i


def test_rows_per_source_follow_the_weights_and_add_up():
    assert rows_per_source([10, 30], [0.7, 0.3]) == [28, 12]
    assert rows_per_source([10, 30], [7, 3]) == [28, 12]  # weights are normalised
    assert rows_per_source([1, 1, 1], [1, 1, 1]) == [1, 1, 1]
    assert rows_per_source([5, 5], [1, 2]) == [3, 7]  # 3.33 / 6.67: the larger remainder gets the row
    assert sum(rows_per_source([7, 11, 13], [0.2, 0.5, 0.3])) == 31


def test_upsampled_source_repeats_evenly_and_downsampled_source_spreads_evenly():
    mix = WeightedMix([_Rows("a", 10), _Rows("b", 30)], [0.7, 0.3])
    rows = [mix[i] for i in range(len(mix))]
    assert len(mix) == 40
    per_source = Counter(name for name, _ in rows)
    assert per_source == {"a": 28, "b": 12}
    repeats = Counter(i for name, i in rows if name == "a")
    assert set(repeats) == set(range(10)) and set(repeats.values()) == {2, 3}  # 28 / 10 = 2.8
    b_rows = [i for name, i in rows if name == "b"]
    assert len(set(b_rows)) == 12 and b_rows == sorted(b_rows) and b_rows[0] == 0 and b_rows[-1] >= 27


def test_shuffled_epoch_has_the_proportions_and_resume_continues_it():
    mix = WeightedMix([_Rows("a", 50), _Rows("b", 150), _Rows("c", 100)], [0.5, 0.25, 0.25])
    order = [mix[i] for i in ResumableDistributedSampler(len(mix), num_replicas=1, rank=0, seed=3)]
    assert Counter(name for name, _ in order) == {"a": 150, "b": 75, "c": 75}
    resumed = ResumableDistributedSampler(len(mix), num_replicas=1, rank=0, seed=3)
    resumed.set_epoch(0, consumed=123)
    assert [
        WeightedMix([_Rows("a", 50), _Rows("b", 150), _Rows("c", 100)], [0.5, 0.25, 0.25])[i] for i in resumed
    ] == order[123:]


def test_sources_with_different_padding_or_bad_weights_are_refused():
    with pytest.raises(ValueError, match="pad with different ids"):
        WeightedMix([_Rows("a", 3, pad_id=0), _Rows("b", 3, pad_id=1)], [1, 1])
    with pytest.raises(ValueError, match="weights must be positive"):
        WeightedMix([_Rows("a", 3), _Rows("b", 3)], [1, 0])


def test_prepared_text_sources_mix_by_weight(tiny_qwen_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_qwen_dir)
    for name, text in (("code", "def f(x):\n    return x\n"), ("prose", "The quick brown fox jumps. ")):
        (tmp_path / f"{name}.txt").write_text(text * 40)
        prepare("text", tmp_path / f"{name}.txt", tiny_qwen_dir, tmp_path / name, progress=False)
    code, prose = (prepared_text_dataset(tokenizer, tmp_path / n, max_seq_len=32) for n in ("code", "prose"))
    mix = prepared_text_dataset(
        tokenizer,
        [{"path": str(tmp_path / "code"), "weight": 3}, {"path": str(tmp_path / "prose"), "weight": 1}],
        max_seq_len=32,
    )
    assert len(mix) == len(code) + len(prose)
    assert mix.counts == rows_per_source([len(code), len(prose)], [3, 1])
    source, row = mix.source_row(len(mix) - 1)
    assert source == 1 and mix[len(mix) - 1]["input_ids"].tolist() == prose[row]["input_ids"].tolist()
