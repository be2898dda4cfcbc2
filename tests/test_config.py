import pytest
from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

from llava_manager import ImageLayout, ManagerConfig, ManagerConfigError
from llava_manager.config import default_vision_layers
from llava_manager.testing.tiny import tiny_config


def _real_depth_config():
    """LLaVA-OV-0.5B's depths (26-layer SigLIP, 24-layer Qwen2) at tiny widths."""
    vision = SiglipVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=26, num_attention_heads=2)
    text = Qwen2Config(
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=24,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=32,
    )
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=31, video_token_index=30)


def test_defaults_follow_the_paper_on_the_real_depths():
    resolved = ManagerConfig().resolve(_real_depth_config())
    assert resolved.vision_layers == list(range(13, 26))
    assert resolved.llm_layers == [0, 4, 8, 12, 16, 20]
    assert resolved.manager_type == "static" and resolved.grid == "all" and resolved.jitter == 0.01


@pytest.mark.parametrize("depth, expected", [(26, list(range(13, 26))), (4, [2, 3]), (13, list(range(6, 13)))])
def test_top_half_rule(depth, expected):
    assert default_vision_layers(depth) == expected


def test_dict_round_trip():
    config = ManagerConfig(
        manager_type="adaptive_cross",
        vision_layers=[1, 2],
        llm_layers=[0, 3],
        grid="grid",
        jitter=0.02,
        layer_embedding=False,
        query_token_id=5,
    )
    assert ManagerConfig.from_dict(config.to_dict()) == config
    assert ImageLayout.from_dict(ImageLayout("square", "truncate").to_dict()) == ImageLayout("square", "truncate")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"manager_type": "softmax"}, "manager_type"),
        ({"injection": "decoder"}, "injection"),
        ({"grid": "main"}, "grid"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
        ({"layer_embedding": "yes"}, "layer_embedding"),
        ({"vision_layers": [1, 1]}, "vision_layers"),
        ({"llm_layers": "0,4"}, "llm_layers"),
        ({"manager_type": "adaptive", "injection": "projector"}, "manager_type"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ManagerConfigError, match=f"ManagerConfig.{field}="):
        ManagerConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vision_layers": [2, 9]}, r"vision_layers=\[2, 9\].*0\.\.4"),
        ({"llm_layers": [0, 4]}, r"llm_layers=\[0, 4\].*0\.\.3"),
        ({"vision_layers": [3]}, r"at least 2 vision layers"),
        ({"manager_type": "adaptive"}, r"query_token_id=None"),
        ({"manager_type": "adaptive", "query_token_id": 10_000}, r"query_token_id=10000"),
        ({"injection": "projector", "llm_layers": [1]}, r"llm_layers=\[1\]"),
    ],
)
def test_model_dependent_errors_give_the_range_for_this_model(kwargs, message):
    with pytest.raises(ManagerConfigError, match=message):
        ManagerConfig(**kwargs).resolve(tiny_config())


def test_square_layout_rejects_grid_only_managers():
    with pytest.raises(ManagerConfigError, match="grid='grid'"):
        ManagerConfig(grid="grid").resolve(tiny_config(), ImageLayout(mode="square"))


def test_single_vision_layer_is_fine_without_layer_zero():
    resolved = ManagerConfig(vision_layers=[3], llm_layers=[1, 3]).resolve(tiny_config())
    assert resolved.vision_layers == [3] and resolved.llm_layers == [1, 3]


def test_negative_vision_layers_resolve_like_python_indices():
    assert ManagerConfig(vision_layers=[-2, -3]).resolve(tiny_config()).vision_layers == [3, 2]
