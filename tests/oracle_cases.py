"""Read the oracle fixtures (outputs of the authors' original code, tests/fixtures/oracle/README.md)
into transformers-style inputs: expanded image tokens, (height, width) image sizes, exact crops."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

ORACLE_DIR = Path(__file__).parent / "fixtures" / "oracle"
CASES = [c["name"] for c in json.loads((ORACLE_DIR / "manifest.json").read_text())["cases"] if c["status"] == "ok"]
IMAGE_PLACEHOLDER = -200
IM_START = 125


@dataclass
class OracleCase:
    name: str
    meta: dict
    checkpoint: Path
    outputs: dict

    @property
    def valid(self) -> torch.Tensor:
        return self.outputs["attention_mask_expanded"].bool()


def load_case(name: str) -> OracleCase:
    folder = ORACLE_DIR / name
    meta = json.loads((folder / "meta.json").read_text())
    checkpoint = folder / "checkpoint"
    if not checkpoint.is_dir():  # unpad_float_edge reuses another case's checkpoint: "../<case>/checkpoint (...)"
        checkpoint = (folder / meta["checkpoint"].split()[0]).resolve()
    return OracleCase(name, meta, checkpoint, load_file(str(folder / "outputs.safetensors")))


def pixel_crops(case: OracleCase, index: int) -> torch.Tensor:
    """The exact float32 crops the original model saw, (n_crops, 3, 384, 384) (README section 2)."""
    info = case.meta["pixel_crops"][index]
    n = info["num_crops"]
    u8 = np.array(Image.open(ORACLE_DIR / case.name / info["file"]).convert("RGB"))
    u8 = u8.reshape(n, 384, 384, 3).transpose(0, 3, 1, 2)
    x = (u8.astype(np.float64) * (1 / 255)).astype(np.float32)
    return torch.from_numpy((x - np.float32(0.5)) / np.float32(0.5))


def hf_inputs(case: OracleCase, image_token_id: int, pad_id: int = 124) -> dict:
    """input_ids with each -200 expanded to the image's token count, right-padded like the original."""
    expanded_len = case.meta["expanded_shape"][1]
    rows, masks = [], []
    for sample, ids in zip(case.meta["samples"], case.meta["input_ids"]):
        ids = ids[: sample["num_input_ids"]]
        at = ids.index(IMAGE_PLACEHOLDER)
        row = ids[:at] + [image_token_id] * sample["visual_length_main"] + ids[at + 1 :]
        assert len(row) == sample["expanded_length"]
        masks.append([1] * len(row) + [0] * (expanded_len - len(row)))
        rows.append(row + [pad_id] * (expanded_len - len(row)))
    crops = [pixel_crops(case, i) for i in range(len(case.meta["pixel_crops"]))]
    max_crops = max(c.shape[0] for c in crops)
    pixel_values = torch.zeros(len(crops), max_crops, 3, 384, 384)
    for i, c in enumerate(crops):
        pixel_values[i, : c.shape[0]] = c
    sizes_wh = case.meta["image_sizes_wh"]
    return {
        "input_ids": torch.tensor(rows),
        "attention_mask": torch.tensor(masks),
        "pixel_values": pixel_values,
        "image_sizes": torch.tensor([[h, w] for w, h in sizes_wh]),
    }


def max_logit_diff(case: OracleCase, logits: torch.Tensor) -> float:
    reference = case.outputs["logits"]
    return (logits[case.valid] - reference[case.valid]).abs().max().item()


def case_logits(case: OracleCase, attn_implementation: str) -> torch.Tensor:
    """Our logits for `case`, through `load_original` (adaptive cases need the `<|im_start|>` id)."""
    import llava_manager

    adaptive = case.meta["settings"]["mm_manager_type"].startswith("adaptive")
    kwargs = {"im_start_token_id": IM_START} if adaptive else {}
    model = llava_manager.load_original(case.checkpoint, attn_implementation=attn_implementation, **kwargs)
    inputs = hf_inputs(case, model.config.image_token_id)
    with torch.no_grad():
        return model(**inputs).logits


if __name__ == "__main__":  # python tests/oracle_cases.py: the max |logit diff| of every case on this machine
    print(f"{'case':<28}{'eager':>10}{'sdpa':>10}")
    for name in CASES:
        case = load_case(name)
        eager, sdpa = (max_logit_diff(case, case_logits(case, attn)) for attn in ("eager", "sdpa"))
        print(f"{name:<28}{eager:>10.1e}{sdpa:>10.1e}")
