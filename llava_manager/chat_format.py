"""Qwen ChatML as LLaVA-OneVision's `qwen_1_5` conversation writes it: the one place that knows the format.

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<image>\\nQUESTION<|im_end|>\\n
    <|im_start|>assistant\\n

In a user turn the images come first, each followed by "\\n", then the text. The processor's chat template, the
chat app's fallback prompt, the training data's segments and lmms-eval's templates are all built from this module.
"""

SYSTEM_PROMPT = "You are a helpful assistant."
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"


def header(role: str) -> str:
    """`<|im_start|>ROLE\\n`: what opens a turn (and, for the assistant, the generation prompt)."""
    return f"{IM_START}{role}\n"


def turn(role: str, text: str) -> str:
    """One whole turn: `<|im_start|>ROLE\\nTEXT<|im_end|>\\n`."""
    return f"{header(role)}{text}{IM_END}\n"


def user_prompt(question: str, num_images: int = 0, system: str = SYSTEM_PROMPT, num_videos: int = 0) -> str:
    """The generation prompt for one user turn with `num_images` images and `num_videos` videos, media first."""
    media = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in range(num_images)) + f"{VIDEO_PLACEHOLDER}\n" * num_videos
    return turn("system", system) + turn("user", media + question) + header("assistant")


# The same format as a Jinja chat template, for tokenizers and processors (`apply_chat_template`).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    + turn("system", SYSTEM_PROMPT)
    + "{% endif %}"
    + IM_START
    + "{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for content in message['content'] %}{% if content['type'] == 'video' %}<video>\n{% endif %}{% endfor %}"
    "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}" + IM_END + "\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + header("assistant") + "{% endif %}"
)
