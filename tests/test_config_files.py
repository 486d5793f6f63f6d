"""`--config` values: a file, or the name of a shipped config."""

import pytest

from omnilong.config_files import CONFIG_ROOT, resolve_config, shipped_configs


@pytest.fixture
def root(tmp_path):
    for name in ("tiny/stage1_text", "big/stage1_text", "big/stage3_video_sft"):
        (tmp_path / "shipped" / f"{name}.yaml").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "shipped" / f"{name}.yaml").write_text("max_steps: 1\n")
    return tmp_path / "shipped"


def test_the_shipped_configs_are_the_checkouts_configs_folder():
    assert {"tiny/stage1_text", "qwen2_5_vl_7b/stage3_video_sft"} <= set(shipped_configs())
    assert shipped_configs()["tiny/stage1_text"] == CONFIG_ROOT / "tiny/stage1_text.yaml"


def test_an_existing_file_wins_over_a_shipped_name(root, tmp_path, monkeypatch):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny/stage1_text.yaml").write_text("max_steps: 2\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_config("tiny/stage1_text.yaml", root).resolve() == tmp_path / "tiny/stage1_text.yaml"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("big/stage3_video_sft", "big/stage3_video_sft.yaml"),
        ("big/stage1_text.yaml", "big/stage1_text.yaml"),
        ("stage3_video_sft.yaml", "big/stage3_video_sft.yaml"),
        ("stage3_video_sft", "big/stage3_video_sft.yaml"),
    ],
)
def test_a_name_resolves_against_the_shipped_configs(root, tmp_path, monkeypatch, value, expected):
    monkeypatch.chdir(tmp_path)  # where none of these names is a file
    assert resolve_config(value, root) == root / expected


def test_a_file_name_several_configs_share_is_refused_listing_them(root):
    with pytest.raises(
        FileNotFoundError, match="several shipped configs have that name: big/stage1_text, tiny/stage1_text"
    ):
        resolve_config("stage1_text.yaml", root)


def test_an_unknown_name_is_refused_with_the_closest_names(root):
    with pytest.raises(
        FileNotFoundError,
        match=r"config tiny/stage1_txt: no such file, nor a shipped config "
        r"\(3 in .*\); did you mean tiny/stage1_text",
    ):
        resolve_config("tiny/stage1_txt", root)


def test_without_shipped_configs_a_name_asks_for_a_path(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"nor a shipped config \(0 in .*\) \(a non-editable install does "
        r"not ship them\); give a path",
    ):
        resolve_config("tiny/stage1_text", tmp_path / "site-packages" / "configs")
