"""Tiny random LLaVA-OneVision models and a tiny tokenizer, built in code (no downloads).

Used by the tests, the demo and the benchmarks. The tokenizer is a word-level
`tokenizers` model with Qwen's ChatML special tokens, so prompts look like the real
`qwen_1_5` template: `<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n...`.
"""

from __future__ import annotations

import string

from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from ..chat_format import CHAT_TEMPLATE, SYSTEM_PROMPT  # noqa: F401  (Qwen ChatML, `qwen_1_5`)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<unk>"]

_WORDS = [
    "system",
    "user",
    "assistant",
    "you",
    "are",
    "a",
    "an",
    "the",
    "helpful",
    "is",
    "what",
    "which",
    "where",
    "how",
    "many",
    "of",
    "in",
    "on",
    "at",
    "to",
    "and",
    "or",
    "color",
    "colour",
    "shape",
    "image",
    "picture",
    "this",
    "that",
    "there",
    "it",
    "its",
    "left",
    "right",
    "top",
    "bottom",
    "middle",
    "center",
    "centre",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "gray",
    "grey",
    "pink",
    "brown",
    "cyan",
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "dot",
    "rectangle",
    "big",
    "small",
    "large",
    "tiny",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "zero",
    "yes",
    "no",
    "describe",
    "question",
    "answer",
    "see",
    "show",
    "shows",
    "shown",
    "object",
    "objects",
    "background",
    "position",
    "located",
    "side",
    "half",
    "upper",
    "lower",
    "corner",
    "with",
    "without",
    "number",
    "count",
    "is",
    "are",
    "has",
    "have",
    "do",
    "does",
]


MEDIA_TOKENS = ("<image>", "<video>")


def tiny_vocabulary(media_tokens: bool = True) -> list[str]:
    """Every token of the tiny tokenizer, special tokens first (ids 0..5; 0..3 without the media tokens)."""
    specials = [t for t in SPECIAL_TOKENS if media_tokens or t not in MEDIA_TOKENS]
    singles = list(string.ascii_lowercase + string.ascii_uppercase + string.digits) + list(".,?!:;'\"-()/ \n")
    words = []
    for word in _WORDS:
        for form in (word, word.capitalize()):
            if form not in words and form not in singles:
                words.append(form)
    return specials + singles + words


def tiny_tokenizer(model_max_length: int = 4096, media_tokens: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Qwen ChatML specials; unknown words fall back to characters.

    `media_tokens=False`: without `<image>` / `<video>`, like a text-only LLM's tokenizer (Qwen2's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(tiny_vocabulary(media_tokens))}
    known_words = "|".join(sorted((w for w in vocab if len(w) > 1 and w.isalpha()), key=len, reverse=True))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # known words as one token each; anything else character by character
    core.pre_tokenizer = pre_tokenizers.Split(Regex(rf"\b(?:{known_words})\b|."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", *(MEDIA_TOKENS if media_tokens else ())],
        model_max_length=model_max_length,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(
    *,
    vision_layers: int = 4,
    text_layers: int = 4,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    vocab_size: int | None = None,
    grid_pinpoints: list[list[int]] | None = None,
    vision_aspect_ratio: str = "anyres_max_9",
) -> LlavaOnevisionConfig:
    """A tiny LLaVA-OV config (SigLIP + Qwen2) whose token ids agree with `tiny_tokenizer()`."""
    vocab = tiny_vocabulary()
    image_token_id, video_token_id = vocab.index("<image>"), vocab.index("<video>")
    vocab_size = vocab_size or (len(vocab) + 15) // 16 * 16
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    text = Qwen2Config(
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=vocab.index("<|endoftext|>"),
        eos_token_id=vocab.index("<|im_end|>"),
        pad_token_id=vocab.index("<|endoftext|>"),
    )
    s = image_size
    pinpoints = grid_pinpoints or [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s], [s, 3 * s], [3 * s, s]]
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        tie_word_embeddings=True,
    )


def tiny_model(seed: int = 0, **config_kwargs) -> LlavaOnevisionForConditionalGeneration:
    """A tiny LLaVA-OV with random weights, in eval mode, fp32."""
    import torch

    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(tiny_config(**config_kwargs))
    return model.eval()


def tiny_processor(config: LlavaOnevisionConfig | None = None):
    """The real HF `LlavaOnevisionProcessor` matched to a tiny config (SigLIP normalisation)."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessor
    from transformers.utils import is_torchvision_available

    config = config or tiny_config()
    size = config.vision_config.image_size
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": size, "width": size},
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = None  # transformers' video processors need torchvision (the `vision` extra)
    if is_torchvision_available():
        from transformers.models.llava_onevision import LlavaOnevisionVideoProcessor

        video_processor = LlavaOnevisionVideoProcessor(
            size={"height": size, "width": size}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
        )
    tokens_per_crop = (size // config.vision_config.patch_size) ** 2
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        video_processor=video_processor,
        num_image_tokens=tokens_per_crop,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=CHAT_TEMPLATE,
    )
