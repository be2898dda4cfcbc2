"""Prompts exactly as the authors' lmms-eval model (`llava_onevision`, LLaVA-NeXT conversations) built them.

The paper's numbers come from LLaVA-NeXT's `conv_templates["qwen_1_5"]` (a `SeparatorStyle.CHATML`
conversation) with the image placeholders put in front of the question:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<image>\\nQUESTION<|im_end|>\\n
    <|im_start|>assistant\\n

Several images are joined by a space (`<image> <image>\\n`), a question that already holds `<image>`
is left alone, and a text-only question gets no placeholder. A video gets `<video>` where LLaVA-NeXT
wrote `<image>` (after the images). The HF processor then expands each placeholder into the model's
image or video tokens. Pure string code: no lmms-eval, no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from llava_manager.chat_format import IM_END, IM_START, IMAGE_PLACEHOLDER, SYSTEM_PROMPT, VIDEO_PLACEHOLDER


@dataclass(frozen=True)
class ChatMLTemplate:
    """A LLaVA-NeXT `SeparatorStyle.CHATML` conversation template."""

    system: str
    roles: tuple[str, str] = (f"{IM_START}user", f"{IM_START}assistant")
    sep: str = IM_END

    def render(self, turns: list[tuple[int, str]], *, add_generation_prompt: bool = True) -> str:
        """`turns` are (role index, text) pairs; role 0 is the user, 1 the assistant."""
        out = "" if not self.system else self.system + self.sep + "\n"
        for role, text in turns:
            out += self.roles[role] + "\n" + text + self.sep + "\n"
        if add_generation_prompt:
            out += self.roles[1] + "\n"
        return out


# LLaVA-NeXT registers the same ChatML conversation as "qwen_1_5" and "qwen_2".
CONV_TEMPLATES: dict[str, ChatMLTemplate] = {
    "qwen_1_5": ChatMLTemplate(system=f"{IM_START}system\n{SYSTEM_PROMPT}"),
    "qwen_2": ChatMLTemplate(system=f"{IM_START}system\n{SYSTEM_PROMPT}"),
}


def get_template(name: str) -> ChatMLTemplate:
    try:
        return CONV_TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"conv_template={name!r} is not supported; choose one of {sorted(CONV_TEMPLATES)} "
            "(the LLaVA-OV-Manager checkpoints were trained and evaluated with qwen_1_5)"
        ) from None


def with_image_placeholders(context: str, num_images: int, num_videos: int = 0) -> str:
    """Put `num_images` image and `num_videos` video placeholders (space separated) and a newline before the
    question, unless the question already places them itself or there is no image or video."""
    if num_images + num_videos <= 0 or IMAGE_PLACEHOLDER in context or VIDEO_PLACEHOLDER in context:
        return context
    return " ".join([IMAGE_PLACEHOLDER] * num_images + [VIDEO_PLACEHOLDER] * num_videos) + "\n" + context


def _is_json_conversation(text: str) -> bool:
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return False
    return isinstance(value, list) and all(isinstance(item, dict) and "value" in item for item in value)


def build_prompt(context: str, num_images: int, conv_template: str = "qwen_1_5", num_videos: int = 0) -> str:
    """The full prompt for one request, ending with the assistant header.

    A context that is a JSON list of `{"from": ..., "value": ...}` turns (lmms-eval's conversational
    tasks) becomes a multi-turn conversation with alternating user / assistant roles, as in the
    authors' model; anything else is one user turn.
    """
    template = get_template(conv_template)
    question = with_image_placeholders(context, num_images, num_videos)
    if _is_json_conversation(question):
        turns = [(index % 2, item["value"]) for index, item in enumerate(json.loads(question))]
        if len(turns) % 2 != 1:
            raise ValueError("a conversational context must end with a user turn")
        return template.render(turns)
    return template.render([(0, question)])
