"""The ChatML format has one owner (llava_manager/chat_format.py); every place that writes a prompt agrees with it."""

from llava_manager.chat_format import SYSTEM_PROMPT, turn, user_prompt
from llava_manager.eval.prompt import CONV_TEMPLATES
from llava_manager.testing.tiny import tiny_processor


def test_the_processor_template_and_the_eval_template_write_the_same_prompt():
    processor = tiny_processor()
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which is larger?"}]
    from_template = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\n<image>\nWhich is larger?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert from_template == user_prompt("Which is larger?", num_images=2) == expected
    assert CONV_TEMPLATES["qwen_1_5"].render([(0, "<image>\nWhich is larger?")]) == user_prompt("Which is larger?", 1)


def test_a_system_turn_replaces_the_default():
    processor = tiny_processor()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=False)
    assert rendered == turn("system", "Be brief.") + turn("user", "Hi") and SYSTEM_PROMPT not in rendered
