"""The LLaVA-OneVision evaluation family against transformers' ``LlavaOnevisionProcessor``
(oracle): the same prompt (an anyres image, a decoded video with an odd frame count, text)
gives bitwise the same ``input_ids`` and vision inputs (the video pixels in OmniLong's flat
``[frames, 3, S, S]`` layout, the processor's being ``[1, frames, 3, S, S]``), and generation
from the processor's whole output equals generation from the family's."""

import json
import shutil

import pytest
import torch
from transformers import AutoProcessor

from omnilong.data.video import decode_video
from omnilong.eval.family import Prompt, family_for
from omnilong.generation.generate import greedy_generate


def _processor_output(model_dir, prompt):
    processor = AutoProcessor.from_pretrained(model_dir)
    content = [{"type": "image"} for _ in prompt.images] + [{"type": "video"}] * (prompt.video is not None)
    content.append({"type": "text", "text": prompt.text})
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    videos = None if prompt.video is None else [prompt.video.frames]
    return dict(
        processor(
            text=[text], images=[list(prompt.images)] if prompt.images else None, videos=videos, return_tensors="pt"
        )
    )


def test_prompt_inputs_equal_the_transformers_processor(tiny_llava_inference, tiny_llava_dir, tiny_videos_dir):
    loaded, family = tiny_llava_inference
    video = decode_video(tiny_videos_dir / "video_002.mp4", 1.0, 3)
    image = (torch.arange(3 * 50 * 130) % 253).to(torch.uint8).view(3, 50, 130)  # wide: base crop + a 2x4 grid
    prompt = Prompt("Which colour?", (image,), video)
    ours, answer_length = family.prompt_inputs(prompt)
    theirs = _processor_output(tiny_llava_dir, prompt)
    assert answer_length == 0 and video.frames.shape[0] % 2 == 1
    assert torch.equal(ours.pop("pixel_values_videos")[None], theirs["pixel_values_videos"])
    assert ours.pop("video_num_frames").tolist() == [video.frames.shape[0]]
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    assert set(theirs) - set(ours) == {"attention_mask", "pixel_values_videos"}

    generated = greedy_generate(loaded.model, theirs, 4, family.stop_token_ids)
    assert generated == greedy_generate(loaded.model, family.prompt_inputs(prompt)[0], 4, family.stop_token_ids)


def test_several_images_take_their_base_crops_as_the_processor(tiny_llava_inference, tiny_llava_dir):
    loaded, family = tiny_llava_inference
    images = tuple((torch.arange(3 * h * w) % 251).to(torch.uint8).view(3, h, w) for h, w in ((50, 130), (90, 40)))
    prompt = Prompt("Same?", images)
    ours, _ = family.prompt_inputs(prompt, answer="no")
    theirs = _processor_output(tiny_llava_dir, prompt)
    assert int((ours["input_ids"] == family.image_token).sum()) == 2 * (9 + 1)  # 3x3 features + newline each
    answer = torch.tensor(loaded.tokenizer("no", add_special_tokens=False)["input_ids"])
    assert torch.equal(ours["input_ids"], torch.cat([theirs["input_ids"][0], answer])[None])
    for key in ("pixel_values", "image_sizes", "batch_num_images"):
        assert torch.equal(ours[key], theirs[key]), key


def test_stop_tokens_and_refused_pixel_limits(tiny_llava_inference, tiny_llava_dir):
    loaded, family = tiny_llava_inference
    assert family.stop_token_ids == sorted(loaded.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    assert family.frames_per_step == 1
    with pytest.raises(ValueError, match=r"\['video_max_pixels'\] do not apply to LLaVA-OneVision"):
        family_for("llava_onevision", loaded.tokenizer, tiny_llava_dir, video_max_pixels=1000)


def test_video_normalisation_from_the_checkpoint_and_missing_image_processor_named(
    tiny_llava_inference, tiny_llava_dir, tmp_path
):
    tokenizer = tiny_llava_inference[0].tokenizer
    for name in ("config.json", "processor_config.json"):
        shutil.copy(tiny_llava_dir / name, tmp_path / name)
    processor = json.loads((tmp_path / "processor_config.json").read_text())
    processor["video_processor"].update(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    (tmp_path / "processor_config.json").write_text(json.dumps(processor))
    family = family_for("llava_onevision", tokenizer, tmp_path)
    assert (family.video_format.mean, family.video_format.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    (tmp_path / "processor_config.json").unlink()
    family = family_for("llava_onevision", tokenizer, tmp_path)
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json .* image processor"):
        family.prompt_inputs(Prompt("?", (torch.zeros(3, 8, 8, dtype=torch.uint8),)))
