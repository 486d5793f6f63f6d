"""Stage-2 chat formatting: labels only on assistant turns, shifted once (one sample per row
here; packing: tests/data/test_packing.py)."""

import copy
import json

import pytest
import torch

from omnilong.data import chat_dataset, collate_padded, load_tokenizer
from omnilong.data.chat import chat_content_form


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen_dir):
    return load_tokenizer(tiny_qwen_dir)


def _jsonl(path, samples):
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def _conversation(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def test_only_assistant_tokens_are_trained(tokenizer, tmp_path):
    sample = _conversation(
        ("user", "name a module"), ("assistant", "pathlib"), ("user", "another"), ("assistant", "textwrap")
    )
    ds = chat_dataset(tokenizer, _jsonl(tmp_path / "c.jsonl", [sample]), max_seq_len=256, packed=False)
    row = ds[0]
    ids, labels = row["input_ids"], row["labels"]
    trained_targets = ids[1:][labels[:-1] != -100]
    text = tokenizer.decode(trained_targets)
    assert text == "pathlib<|im_end|>\ntextwrap<|im_end|>\n"
    # shifted once: label t is token t+1
    keep = labels != -100
    assert torch.equal(labels[:-1][keep[:-1]], ids[1:][keep[:-1]])
    assert labels[-1] == -100


def test_sample_without_assistant_turn_trains_nothing(tokenizer, tmp_path):
    ds = chat_dataset(
        tokenizer, _jsonl(tmp_path / "c.jsonl", [_conversation(("user", "hello"))]), max_seq_len=64, packed=False
    )
    assert (ds[0]["labels"] == -100).all()


def test_malformed_message_is_named(tokenizer, tmp_path):
    f = _jsonl(tmp_path / "c.jsonl", [_conversation(("user", "a")), {"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(ValueError, match=r"c\.jsonl:2: message 0"):
        chat_dataset(tokenizer, f, max_seq_len=64)


def test_too_long_sample_is_an_error_or_skipped_and_counted(tokenizer, tmp_path):
    f = _jsonl(
        tmp_path / "c.jsonl",
        [_conversation(("user", "hi"), ("assistant", "x " * 200)), _conversation(("user", "hi"), ("assistant", "ok"))],
    )
    with pytest.raises(ValueError, match=r"c\.jsonl:1: sample has \d+ tokens, more than max_seq_len=64"):
        chat_dataset(tokenizer, f, max_seq_len=64)
    ds = chat_dataset(tokenizer, f, max_seq_len=64, skip_bad_samples=True, packed=False)
    assert len(ds) == 1 and ds.num_skipped == 1


def test_collate_pads_right_with_ignored_labels_and_own_document(tokenizer, tmp_path):
    f = _jsonl(
        tmp_path / "c.jsonl",
        [
            _conversation(("user", "hi"), ("assistant", "a long answer here")),
            _conversation(("user", "hi"), ("assistant", "ok")),
        ],
    )
    ds = chat_dataset(tokenizer, f, max_seq_len=128, packed=False)
    batch = collate_padded([ds[0], ds[1]], pad_id=ds.pad_id)
    n = len(ds[1]["input_ids"])
    assert batch["input_ids"].shape[0] == 2
    assert (batch["labels"][1, n:] == -100).all() and (batch["document_ids"][1, n:] == -1).all()
    assert (batch["input_ids"][1, n:] == ds.pad_id).all()
    assert batch["position_ids"][1].tolist() == list(range(batch["input_ids"].shape[1]))


def _with_template(tokenizer, template: str):
    changed = copy.deepcopy(tokenizer)
    changed.chat_template = template
    return changed


def test_llava_template_renders_strings_as_nothing_like_the_hub(tiny_llava_dir):
    llava = load_tokenizer(tiny_llava_dir)
    assert (
        llava.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        == "<|im_start|>user\n<|im_end|>\n"
    )
    assert chat_content_form(llava) == "parts"


def test_llava_template_trains_on_the_answers_text(tiny_llava_dir, tmp_path):
    llava = load_tokenizer(tiny_llava_dir)
    sample = _conversation(("user", "name a module"), ("assistant", "pathlib"))
    ds = chat_dataset(llava, _jsonl(tmp_path / "c.jsonl", [sample]), max_seq_len=256, packed=False)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert llava.decode(ids) == "<|im_start|>user\nname a module<|im_end|>\n<|im_start|>assistant\npathlib<|im_end|>\n"
    assert llava.decode(ids[1:][labels[:-1] != -100]) == "pathlib<|im_end|>\n"


def test_template_that_drops_a_message_is_refused_naming_sample_template_and_message(tokenizer, tmp_path):
    no_system = _with_template(
        tokenizer,
        "{%- for m in messages %}{%- if m['role'] != 'system' %}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    )
    f = _jsonl(tmp_path / "c.jsonl", [_conversation(("system", "be terse"), ("user", "hi"), ("assistant", "ok"))])
    with pytest.raises(
        ValueError, match=r"c\.jsonl:1: the chat template of .*tiny_qwen.* drops .* message 0 \(system\)"
    ):
        chat_dataset(no_system, f, max_seq_len=64)


def test_template_that_renders_no_text_is_refused_before_reading_samples(tokenizer, tmp_path):
    roles_only = _with_template(
        tokenizer, "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '<|im_end|>' }}{%- endfor %}"
    )
    f = _jsonl(tmp_path / "c.jsonl", [_conversation(("user", "hi"), ("assistant", "ok"))])
    with pytest.raises(ValueError, match=r"the chat template of .*tiny_qwen.* renders a message's text neither"):
        chat_dataset(roles_only, f, max_seq_len=64)
