"""transformers' `ModelTesterMixin` on a tiny LLaVA-OneVision, vanilla or with Managers (run by run.py, not by our
pytest: `tests` must resolve to transformers' tests package).

`LLAVA_MANAGER_SUITE_MODE` picks what the tests build:
- `vanilla`: transformers' `LlavaOnevisionForConditionalGeneration` and `LlavaOnevisionModel`;
- `llm` / `projector`: our registered `LlavaOnevisionManagerForConditionalGeneration` / `LlavaOnevisionManagerModel`
  with a config carrying Managers at that injection site, so every model a test builds (from a config, from
  `from_pretrained`, on the meta device) has them. Their `_init_weights` draws the Manager weights non-zero here, so a
  Manager that is skipped or wired wrongly changes results (zero weights would hide it); transformers' seeding keeps
  the draws identical between the paths `test_can_init_all_missing_weights` compares.
"""

import os
import unittest

import torch
from tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel
from transformers.testing_utils import torch_device

MODE = os.environ.get("LLAVA_MANAGER_SUITE_MODE", "vanilla")
if MODE not in ("vanilla", "llm", "projector"):
    raise ValueError(f"LLAVA_MANAGER_SUITE_MODE={MODE!r}: expected vanilla, llm or projector")

TEXT_CONFIG = {
    "model_type": "qwen2",
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 37,
    "hidden_act": "gelu",
    "max_position_embeddings": 580,
    "initializer_range": 0.02,
    "pad_token_id": 0,
}
VISION_CONFIG = {
    "image_size": 16,
    "patch_size": 8,
    "num_channels": 3,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "initializer_range": 0.02,
}
IMAGE_TOKEN_ID = 1

if MODE == "vanilla":
    MODEL_CLASSES = {"generation": LlavaOnevisionForConditionalGeneration, "bare": LlavaOnevisionModel}
else:
    from transformers import initialization as init

    from llava_manager import ManagerConfig
    from llava_manager.managers import AdaptiveManager, StaticManager
    from llava_manager.modeling import (
        MANAGER_CLASS_OF,
        LlavaOnevisionManagerConfig,
        LlavaOnevisionManagerForConditionalGeneration,
        LlavaOnevisionManagerModel,
        _ManagerModelMixin,
    )

    MODEL_CLASSES = {
        "generation": LlavaOnevisionManagerForConditionalGeneration,
        "bare": LlavaOnevisionManagerModel,
    }
    _plain_init_weights = _ManagerModelMixin._init_weights

    @torch.no_grad()
    def _non_zero_init_weights(self, module):
        if isinstance(module, StaticManager):
            init.normal_(module.layer_scores, mean=0.0, std=0.5)
        elif isinstance(module, AdaptiveManager):
            init.normal_(module.zero_gate, mean=0.0, std=0.5)
        else:
            _plain_init_weights(self, module)

    _ManagerModelMixin._init_weights = _non_zero_init_weights

    def _list_like_an_in_tree_model():
        """transformers' tests decide what to run by looking class names up in its in-tree name tables
        (`MODEL_MAPPING_NAMES` ...: a base model gets no labels and no training test). Our classes are registered
        with the Auto classes at run time, which those tables do not see: list them there the way `llava_onevision`
        is listed, so each test treats our classes as it treats transformers' own."""
        from transformers.models.auto import modeling_auto

        ours = {base.__name__: cls.__name__ for base, cls in MANAGER_CLASS_OF.items()}  # transformers' name -> ours
        for name in dir(modeling_auto):
            table = getattr(modeling_auto, name)
            if name.endswith("MAPPING_NAMES") and isinstance(table, dict) and table.get("llava_onevision") in ours:
                table["llava_onevision_manager"] = ours[table["llava_onevision"]]

    _list_like_an_in_tree_model()


def tiny_config():
    kwargs = dict(
        text_config=dict(TEXT_CONFIG),
        vision_config=dict(VISION_CONFIG),
        image_token_index=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[16, 16]],
    )
    if MODE == "vanilla":
        return LlavaOnevisionConfig(**kwargs)
    manager = ManagerConfig(injection=MODE, vision_layers=[1, 2], llm_layers=[0, 1] if MODE == "llm" else None)
    plain = LlavaOnevisionConfig(**kwargs)
    resolved = manager.resolve(plain)
    return LlavaOnevisionManagerConfig(manager=resolved.to_dict(), **kwargs)


class LlavaOnevisionTinyTester:
    batch_size = 3
    text_length = 7
    image_size = (45, 45)

    def __init__(self, parent):
        self.parent = parent
        self.is_training = True
        self.num_hidden_layers = TEXT_CONFIG["num_hidden_layers"]
        self.hidden_size = TEXT_CONFIG["hidden_size"]
        self.num_attention_heads = TEXT_CONFIG["num_attention_heads"]
        self.vocab_size = TEXT_CONFIG["vocab_size"]
        self.vision_config = VISION_CONFIG
        self.num_crops = 2  # the base image and one grid crop (pinpoint 16x16)
        self.num_image_tokens = self._image_tokens()
        self.seq_length = self.text_length + self.num_image_tokens

    def _image_tokens(self) -> int:
        """Image tokens per image, as the vanilla model packs them (computed, not hand-counted)."""
        torch.manual_seed(0)
        model = LlavaOnevisionModel(
            LlavaOnevisionConfig(
                **{
                    k: v
                    for k, v in tiny_config().to_dict().items()
                    if k not in ("manager", "image_layout", "model_type")
                }
            )
        )
        with torch.no_grad():
            output = model.get_image_features(
                pixel_values=torch.zeros(1, self.num_crops, 3, 16, 16), image_sizes=torch.tensor([self.image_size])
            )
        return int(output.pooler_output[0].shape[0])

    def get_config(self):
        return tiny_config()

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        pixel_values = floats_tensor([self.batch_size, self.num_crops, 3, 16, 16])
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 2) + 2
        input_ids[:, : self.num_image_tokens] = IMAGE_TOKEN_ID  # images first, then text
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=torch_device)
        inputs = {
            "pixel_values": pixel_values,
            "image_sizes": torch.tensor([self.image_size] * self.batch_size),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }
        return config, inputs


class _Common(ModelTesterMixin):
    _is_composite = True
    test_pruning = False
    test_head_masking = False
    test_resize_embeddings = True
    # get_image_features returns the tower's output for every crop (base + grid), not one row per image
    skip_test_image_features_output_shape = True

    def setUp(self):
        self.model_tester = LlavaOnevisionTinyTester(self)


class LlavaOnevisionForConditionalGenerationGenericTest(_Common, unittest.TestCase):
    all_model_classes = (MODEL_CLASSES["generation"],)


class LlavaOnevisionModelGenericTest(_Common, unittest.TestCase):
    all_model_classes = (MODEL_CLASSES["bare"],)
