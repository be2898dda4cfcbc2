"""What a plain `pip install llava-manager` (no extras) can do: import, patch, run, save and load a tiny model.

Run by `make test-bare` in a venv holding only torch and `pip install .` (no torchvision, DeepSpeed, PEFT,
accelerate, matplotlib, lmms-eval), and by tests/test_extras.py with those modules blocked
(`--block`), so a core module that starts importing an extra fails the fast suite too.

    python tests/bare_install.py            # in a bare venv: also checks the extras really are absent
    python tests/bare_install.py --block    # in any venv: hides the extras' modules first
"""

from __future__ import annotations

import argparse
import sys
import tempfile

# PyYAML is left out: huggingface_hub needs it, so every install has it
EXTRA_ONLY_MODULES = ("deepspeed", "peft", "accelerate", "matplotlib", "lmms_eval", "torchvision", "av")


def block_extras() -> None:
    """Make `import X` raise ImportError for every module only an extra brings (as if never installed)."""
    for name in EXTRA_ONLY_MODULES:
        sys.modules[name] = None  # type: ignore[assignment]  (the import system's "not importable" marker)


def check_extras_absent() -> None:
    import importlib.util

    present = [name for name in EXTRA_ONLY_MODULES if importlib.util.find_spec(name) is not None]
    if present:
        raise SystemExit(f"not a bare install: {', '.join(present)} importable")


def picture(size=(40, 28)):
    from PIL import Image

    image = Image.new("RGB", size, (240, 240, 240))
    for x in range(8, 24):
        for y in range(6, 20):
            image.putpixel((x, y), (200, 30, 30))
    return image


def check_core() -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    import llava_manager
    from llava_manager import ManagerConfig, patch_llava, unpatch_llava
    from llava_manager.checkpoint.assembly import build_processor, prepare_tokenizer
    from llava_manager.testing.tiny import tiny_model, tiny_tokenizer

    vanilla = tiny_model(seed=0)
    processor = build_processor(vanilla.config, prepare_tokenizer(tiny_tokenizer()))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[picture()], text=[prompt], return_tensors="pt")

    with torch.no_grad():
        expected = vanilla(**inputs).logits
        model = patch_llava(tiny_model(seed=0), ManagerConfig(vision_layers=[1, 2], llm_layers=[0, 1]))
        patched = model(**inputs).logits
    if not torch.equal(expected, patched):
        raise SystemExit("a freshly patched model (zero-initialised Managers) changed the logits")
    answer = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    print(f"patched tiny model: identity holds, generate -> {answer.shape[1] - inputs['input_ids'].shape[1]} tokens")

    with tempfile.TemporaryDirectory() as folder:
        with torch.no_grad():
            for weight in model.model.manager.parameters():  # Managers that change the output, to see them reload
                weight.normal_(std=0.1)
            before = model(**inputs).logits
        model.save_pretrained(folder)
        loaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
        with torch.no_grad():
            after = loaded(**inputs).logits
        if not torch.equal(before, after):
            raise SystemExit("save_pretrained -> from_pretrained changed the logits")
        print(f"save_pretrained -> AutoModelForImageTextToText.from_pretrained: {type(loaded).__name__}, same logits")
        # a checkpoint's processor is transformers' LLaVA-OV processor, whose video part needs torchvision
        try:
            llava_manager.from_pretrained(folder)
        except ImportError as error:
            if "llava-manager[vision]" not in str(error):
                raise SystemExit(
                    f"from_pretrained without torchvision fails without naming the extra: {error}"
                ) from error
            print(f"llava_manager.from_pretrained without torchvision: {error}")
        else:
            raise SystemExit("llava_manager.from_pretrained loaded a processor although torchvision is missing")
    unpatch_llava(model)


def check_package_data() -> None:
    """The recipes, DeepSpeed configs and lmms-eval task files ship inside the package (not only in a checkout)."""
    from importlib.resources import files

    resources = files("llava_manager") / "resources"
    wanted = [
        "configs/recipes/stage2_si.yaml",
        "configs/recipes/demo.yaml",
        "configs/models/demo.json",
        "configs/ablations/layers_20_26.yaml",
    ]
    wanted += ["configs/deepspeed/zero3.json", "patches/lmms_eval/README.md"]
    missing = [name for name in wanted if not (resources / name).is_file()]
    if missing:
        raise SystemExit(f"package data missing from the install: {', '.join(missing)}")
    print(f"package data: {len(wanted)} shipped files found under {resources}")


def check_extras_refused() -> None:
    try:
        import llava_manager.train  # noqa: F401
    except ImportError as error:
        if "llava-manager[train]" not in str(error):
            raise SystemExit(f"`import llava_manager.train` fails without naming the extra: {error}") from error
        print(f"llava_manager.train without its extra: {error}")
    else:
        raise SystemExit("llava_manager.train imported although its extra's modules are missing")
    from llava_manager.cli import main

    if main(["train", "--help"]) != 1:
        raise SystemExit("`llava-manager train` without its extra should fail with exit status 1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", action="store_true", help="hide the extras' modules instead of requiring absence")
    args = parser.parse_args()
    if args.block:
        block_extras()
    else:
        check_extras_absent()
    check_core()
    check_package_data()
    check_extras_refused()
    print("bare install: OK")


if __name__ == "__main__":
    main()
