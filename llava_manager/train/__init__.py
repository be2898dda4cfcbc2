"""Training: DeepSpeed ZeRO recipes and the `train` entry point (HF Trainer with per-part learning rates).

    python -m llava_manager.train stage2_si --model_name_or_path ... --data_path ... --image_folder ...

See `configs/recipes/` for the paper's stages and `main.py` for the order of work.
"""

from ..extras import require_extra

require_extra("train", "training (llava_manager.train, `llava-manager train`)")

from .recipe import PARTS, Recipe, RecipeError, load_recipe, recipe_from_dict  # noqa: E402

__all__ = ["PARTS", "Recipe", "RecipeError", "load_recipe", "recipe_from_dict", "train"]


def train(recipe, **kwargs):
    """Run a training job; `recipe` is a `Recipe`, a recipe name / path, or a dict. See `main.train`."""
    from .main import train as _train

    if isinstance(recipe, dict):
        recipe = recipe_from_dict(recipe)
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(str(recipe))
    return _train(recipe, **kwargs)
