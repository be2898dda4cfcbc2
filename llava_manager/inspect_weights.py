"""What the Managers learned: mean |weight| per (injection layer, vision layer), as a table and a heatmap.

Each Manager holds one weight per selected vision layer and channel (`layer_scores` of a static Manager,
`zero_gate` of an adaptive one). Averaging |w| over the channels gives one number per (Manager, vision
layer): how much of that vision layer the Manager mixes in, as in the paper's weight figures. All zeros
means identity (an untrained Manager). The Manager at LLM layer 0 has no weight for the last selected
vision layer (as released); that cell is empty.

For adaptive Managers the per-token scores come from the LLM state at run time; the heatmap shows their
learned gate |zero_gate|, the part that does not depend on the input.

    from llava_manager.inspect_weights import manager_weights, format_table, plot_manager_weights
    weights = manager_weights(model)
    print(format_table(weights))
    plot_manager_weights(weights, "weights.png")
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._moved import forward_moved_names
from .attach import llava_model_of, unwrap
from .errors import ManagerError
from .managers import AdaptiveManager, ManagerStack, StaticManager


@dataclass
class ManagerWeights:
    """Mean |w| over channels: `values[r][c]` for Manager row `r` and selected vision layer `c` (NaN: no weight).

    Attributes:
        values (`list[list[float]]`): (rows, vision layers).
        rows (`list[str]`): one label per Manager ("LLM 0", "LLM 4", ... or "projector").
        vision_layers (`list[int]`): the SigLIP `hidden_states` index of each column.
        kinds (`list[str]`): per row, `"static"` (layer_scores) or `"adaptive"` (zero_gate).
        manager_type (`str`), injection (`str`): from the model's Manager config.
    """

    values: list[list[float]]
    rows: list[str]
    vision_layers: list[int]
    kinds: list[str] = field(default_factory=list)
    manager_type: str = "static"
    injection: str = "llm"

    @property
    def max(self) -> float:
        finite = [v for row in self.values for v in row if not math.isnan(v)]
        return max(finite) if finite else 0.0

    @property
    def is_identity(self) -> bool:
        """True when every Manager weight is zero (untrained: the model computes what the unpatched one does)."""
        return self.max == 0.0


def find_manager_stack(model) -> ManagerStack:
    """The `ManagerStack` of a patched model (also inside PEFT / DeepSpeed wrappers); `ManagerError` if none."""
    llava = llava_model_of(unwrap(model))
    stack = getattr(llava, "manager", None)
    if not isinstance(stack, ManagerStack):
        raise ManagerError(
            "this model has no Managers (an unpatched or Baseline checkpoint), so there are no Manager weights to "
            "inspect; patch it with llava_manager.patch_llava or load a Manager checkpoint"
        )
    return stack


def manager_weights(model_or_stack) -> ManagerWeights:
    """Mean |w| over channels for every Manager of `model_or_stack` (a patched model or its `ManagerStack`)."""
    stack = model_or_stack if isinstance(model_or_stack, ManagerStack) else find_manager_stack(model_or_stack)
    config = stack.config
    n_layers = len(config.vision_layers)
    if config.injection == "projector":
        labels = ["projector"]
    else:
        labels = [f"LLM {k}" for k in config.llm_layers]
    values, kinds = [], []
    for manager in stack.managers:
        if isinstance(manager, StaticManager):
            weight, kind = manager.layer_scores, "static"
        elif isinstance(manager, AdaptiveManager):
            weight, kind = manager.zero_gate, "adaptive"
        else:  # pragma: no cover - ManagerStack builds only these two
            raise ManagerError(f"unknown Manager module {type(manager).__name__}")
        weight = _full(weight)
        row = weight.detach().float().abs().mean(dim=-1).cpu().tolist()  # (N_i,)
        values.append(row + [math.nan] * (n_layers - len(row)))
        kinds.append(kind)
    return ManagerWeights(values, labels, list(config.vision_layers), kinds, config.manager_type, config.injection)


def _full(weight: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered first when DeepSpeed ZeRO-3 partitioned it."""
    if getattr(weight, "ds_numel", None) is not None and weight.numel() != weight.ds_numel:
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return weight.detach().clone()
    return weight


# ---- terminal table --------------------------------------------------------------------------------------
def format_table(weights: ManagerWeights, precision: int = 4) -> str:
    """A plain-text table: one row per Manager, one column per vision layer, plus the row's strongest layer."""
    header = ["manager"] + [f"v{v}" for v in weights.vision_layers] + ["top"]
    lines = []
    for label, kind, row in zip(weights.rows, weights.kinds, weights.values):
        cells = ["-" if math.isnan(v) else f"{v:.{precision}f}" for v in row]
        finite = [(v, i) for i, v in enumerate(row) if not math.isnan(v)]
        best = max(finite)[1] if finite and max(finite)[0] > 0 else None
        top = f"v{weights.vision_layers[best]}" if best is not None else "-"
        suffix = " (gate)" if kind == "adaptive" else ""
        lines.append([label + suffix] + cells + [top])
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [render(header), render(["-" * w for w in widths])] + [render(r) for r in lines]
    note = (
        f"mean |w| over channels; {weights.manager_type} Managers, injection={weights.injection!r}; "
        f"columns = SigLIP hidden_states index"
    )
    if weights.is_identity:
        note += "; all zero: the Managers are untrained (identity)"
    return "\n".join(out + [note])


# ---- heatmap --------------------------------------------------------------------------------------------
def pyplot():
    """matplotlib's pyplot on the Agg backend (PNG files, no screen); a clear error without the `plot` extra."""
    try:
        import matplotlib
    except ImportError:
        raise ManagerError(
            "drawing PNGs needs matplotlib: pip install 'llava-manager[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(figure, path: str | Path) -> Path:
    """Write `figure` (laid out tightly) to `path` as PNG, creating the folder, and close it."""
    plt = pyplot()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


def plot_manager_weights(weights: ManagerWeights, path: str | Path, title: str | None = None) -> Path:
    """Write a heatmap (rows: Managers / injection layers, columns: vision layers) of mean |w| to `path` (PNG)."""
    plt = pyplot()
    import numpy as np

    data = np.array(weights.values, dtype=float)
    masked = np.ma.masked_invalid(data)
    n_rows, n_cols = data.shape
    width = max(4.8, 2.4 + 0.55 * n_cols)
    height = max(2.8, 1.6 + 0.42 * n_rows)
    figure, axes = plt.subplots(figsize=(width, height), dpi=120)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")  # grey: no weight (the LLM-0 Manager's last layer)
    vmax = weights.max if weights.max > 0 else 1.0
    image = axes.imshow(masked, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto")
    axes.set_xticks(range(n_cols), [str(v) for v in weights.vision_layers])
    row_labels = [r + (" (gate)" if k == "adaptive" else "") for r, k in zip(weights.rows, weights.kinds)]
    axes.set_yticks(range(n_rows), row_labels)
    axes.set_xlabel("vision layer (SigLIP hidden_states index)")
    axes.set_ylabel("injection" if weights.injection == "projector" else "Manager at LLM layer")
    if n_rows * n_cols <= 120:
        for r in range(n_rows):
            for c in range(n_cols):
                if not np.isnan(data[r, c]):
                    bright = data[r, c] > 0.6 * vmax
                    axes.text(
                        c,
                        r,
                        f"{data[r, c]:.3f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if bright else "white",
                    )
    colorbar = figure.colorbar(image, ax=axes)
    colorbar.set_label("mean |w| over channels")
    default_title = f"Manager weights ({weights.manager_type}, injection={weights.injection})"
    axes.set_title(textwrap.fill(title or default_title, 60), fontsize=9)
    return save_png(figure, path)


# ---- from a checkpoint ------------------------------------------------------------------------------------
def read_manager_stack(folder: str | Path) -> ManagerStack:
    """The `ManagerStack` of an HF-format llava-manager checkpoint folder, read without building the model.

    Only `config.json` and the `model.manager.*` tensors are read (safetensors, sharded or not), so this is quick
    even for large models. Raises `ManagerError` when the folder has no Managers or lacks their tensors."""
    import json

    from safetensors import safe_open

    from .config import ManagerConfig

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    manager = config.get("manager")
    if manager is None:
        raise ManagerError(
            f"{folder} is a checkpoint without Managers (model_type {config.get('model_type')!r}); there are no "
            "Manager weights to inspect"
        )
    manager_config = ManagerConfig.from_dict(manager)
    section = "vision_config" if manager_config.injection == "projector" else "text_config"
    stack = ManagerStack(manager_config, int(config[section]["hidden_size"]))
    wanted = {f"model.manager.{name}": name for name in stack.state_dict()}
    files = sorted(folder.glob("*.safetensors"))
    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                if key in wanted:
                    found[wanted[key]] = handle.get_tensor(key)
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise ManagerError(
            f"{folder}: config.json declares Managers but the safetensors weights lack {len(missing)} of their "
            f"tensors (e.g. model.manager.{missing[0]}); the checkpoint is incomplete"
        )
    stack.load_state_dict(found)
    return stack.eval()


def load_manager_weights(
    path_or_hub_id: str, subfolder: str | None = None, **from_pretrained_kwargs
) -> ManagerWeights:
    """`ManagerWeights` of any checkpoint `llava_manager.from_pretrained` loads (local folder or Hub id, any format).

    HF-format folders with Managers are read directly (config and Manager tensors only); anything else goes
    through `from_pretrained` (converting original-format checkpoints, cached)."""
    from .checkpoint import detect_format, resolve

    source = resolve(
        path_or_hub_id,
        subfolder,
        from_pretrained_kwargs.pop("revision", None),
        **{k: v for k, v in from_pretrained_kwargs.items() if k in ("cache_dir", "token", "local_files_only")},
    )
    checkpoint = detect_format(source.path)
    if checkpoint.kind == "hf" and checkpoint.managers and list(source.path.glob("*.safetensors")):
        return manager_weights(read_manager_stack(source.path))
    if not checkpoint.managers:
        raise ManagerError(
            f"{source.description} is a checkpoint without Managers ({checkpoint.description}); there are no "
            "Manager weights to inspect"
        )
    from .checkpoint import from_pretrained

    model, _ = from_pretrained(path_or_hub_id, subfolder, **from_pretrained_kwargs)
    return manager_weights(model)


__getattr__ = forward_moved_names(__name__, {"plot_loss_curves": "llava_manager.demo.plots"})
