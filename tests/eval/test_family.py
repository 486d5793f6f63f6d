"""The Qwen2.5-VL evaluation family against transformers' own processor (oracle): the same
prompt (an image, a video with an odd frame count, text) gives bitwise the same
``input_ids`` and vision inputs, and generation takes the processor's whole output
(``model(**processor(...))`` inputs) with the same result."""

import pytest
import torch
from transformers import AutoProcessor

from omnilong.data.tokenizer import load_tokenizer
from omnilong.data.video import decode_video
from omnilong.eval.family import Prompt, render_prompt
from omnilong.generation.generate import greedy_generate


def test_prompt_inputs_equal_the_transformers_processor(tiny_inference, tiny_qwen_dir, tiny_videos_dir):
    loaded, family = tiny_inference
    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    video = decode_video(tiny_videos_dir / "video_002.mp4", 1.0, 3)
    image = (torch.arange(3 * 50 * 70) % 253).to(torch.uint8).view(3, 50, 70)
    ours, answer_length = family.prompt_inputs(Prompt("Which colour?", (image,), video))
    content = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Which colour?"}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    theirs = processor(
        text=[text],
        images=[image],
        videos=[video.frames],
        return_tensors="pt",
        cap_pixels_per_frame=False,  # our family caps only with video_total_pixels
        video_metadata=[{"fps": video.fps, "total_num_frames": video.frames.shape[0]}],
    )
    assert answer_length == 0 and video.frames.shape[0] % 2 == 1
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    assert set(theirs) - set(ours) == {"attention_mask", "mm_token_type_ids"}

    generated = greedy_generate(loaded.model, dict(theirs), 4, family.stop_token_ids)
    assert generated == greedy_generate(loaded.model, ours, 4, family.stop_token_ids)


def test_a_template_that_drops_the_prompt_text_is_refused_naming_it(tiny_qwen_dir):
    tokenizer = load_tokenizer(tiny_qwen_dir)
    tokenizer.chat_template = "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '<|im_end|>' }}{%- endfor %}"
    with pytest.raises(ValueError, match=r"the chat template of .*tiny_qwen.* drops .* message 0 \(user\)"):
        render_prompt(tokenizer, Prompt("Which colour?"))
