"""What the Managers learned: mean |weight| per (injection layer, vision layer), as a table and a heatmap.

Each Manager holds one weight per selected vision layer and channel (`layer_scores` of a static Manager,
`zero_gate` of an adaptive one). Averaging |w| over the channels gives one number per (Manager, vision
layer): how much of that vision layer the Manager mixes in, as in the paper's weight figures. All zeros
means identity (an untrained Manager). The Manager at LLM layer 0 has no weight for the last selected
vision layer (as released); that cell is empty.

For adaptive Managers the per-token scores come from the LLM state at run time; the heatmap shows their
learned gate |zero_gate|, the part that does not depend on the input. A bridge Manager reads one vision layer:
its row holds mean |layer_scale| in that layer's column. A tower Manager's row holds its softmax layer weights
(mean over channels, summing to 1), with its temperature beside it; its output is scaled by a per-channel gate.
For these two the heatmap adds a second panel: the per-channel scale (bridge) or gate (tower) of each Manager.

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
from .managers import AdaptiveManager, BridgeManager, ManagerStack, StaticManager, TowerManager


@dataclass
class ManagerWeights:
    """Mean |w| over channels: `values[r][c]` for Manager row `r` and selected vision layer `c` (NaN: no weight).

    Attributes:
        values (`list[list[float]]`): (rows, vision layers).
        rows (`list[str]`): one label per Manager ("LLM 0", "LLM 4", ... or "projector").
        vision_layers (`list[int]`): the SigLIP `hidden_states` index of each column.
        kinds (`list[str]`): per row, `"static"` (layer_scores), `"adaptive"` (zero_gate), `"bridge"` (mean
            |layer_scale| in the bridged layer's column) or `"tower"` (the softmax layer weights, mean over channels).
        manager_type (`str`), injection (`str`): from the model's Manager config.
        channel_values (`list[list[float]]`, *optional*): bridge and tower types: per row, the signed per-channel
            scale (bridge) or gate (tower), `(rows, D)`.
        temperatures (`list[float]`, *optional*): tower type: each Manager's softmax temperature.
    """

    values: list[list[float]]
    rows: list[str]
    vision_layers: list[int]
    kinds: list[str] = field(default_factory=list)
    manager_type: str = "static"
    injection: str = "llm"
    channel_values: list[list[float]] | None = None
    temperatures: list[float] | None = None

    @property
    def max(self) -> float:
        finite = [v for row in self.values for v in row if not math.isnan(v)]
        return max(finite) if finite else 0.0

    @property
    def is_identity(self) -> bool:
        """True when every Manager's output is zero (untrained: the model computes what the unpatched one does):
        all weights zero, or for tower Managers all gates zero."""
        if self.manager_type == "tower":
            return all(v == 0.0 for row in self.channel_values or [] for v in row)
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
    values, kinds, channels, temperatures = [], [], [], []
    for manager in stack.managers:
        if isinstance(manager, StaticManager):
            row, kind = _mean_abs(manager.layer_scores), "static"
        elif isinstance(manager, AdaptiveManager):
            row, kind = _mean_abs(manager.zero_gate), "adaptive"
        elif isinstance(manager, BridgeManager):
            scale = _full(manager.layer_scale).detach().float()  # (D,)
            row = [math.nan] * n_layers
            row[manager.layer] = scale.abs().mean().item()
            kind = "bridge"
            channels.append(scale.cpu().tolist())
        elif isinstance(manager, TowerManager):
            with torch.no_grad():  # the weights without training noise, as in eval
                scores, temperature = _full(manager.layer_scores).float(), _full(manager.temperature).float()
                row = torch.softmax(scores / temperature, dim=0).mean(-1).cpu().tolist()  # (N,), sums to 1
            kind = "tower"
            channels.append(_full(manager.gate).detach().float().cpu().tolist())
            temperatures.append(temperature.item())
        else:  # pragma: no cover - ManagerStack builds only these
            raise ManagerError(f"unknown Manager module {type(manager).__name__}")
        values.append(row + [math.nan] * (n_layers - len(row)))
        kinds.append(kind)
    return ManagerWeights(
        values,
        labels,
        list(config.vision_layers),
        kinds,
        config.manager_type,
        config.injection,
        channel_values=channels or None,
        temperatures=temperatures or None,
    )


def _mean_abs(weight: torch.Tensor) -> list[float]:
    """(N_i, D) weight -> mean |w| over channels, (N_i,)."""
    return _full(weight).detach().float().abs().mean(dim=-1).cpu().tolist()


def _full(weight: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered first when DeepSpeed ZeRO-3 partitioned it."""
    if getattr(weight, "ds_numel", None) is not None and weight.numel() != weight.ds_numel:
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return weight.detach().clone()
    return weight


# ---- terminal table --------------------------------------------------------------------------------------
_ROW_SUFFIX = {"adaptive": " (gate)", "bridge": " (bridge)"}
_NOTES = {
    "bridge": "mean |layer_scale| over channels, in the one layer each Manager bridges",
    "tower": "softmax layer weights, mean over channels (each row sums to 1); output = gate * weighted sum",
}


def format_table(weights: ManagerWeights, precision: int = 4) -> str:
    """A plain-text table: one row per Manager, one column per vision layer, plus the row's strongest layer (and for
    tower Managers the temperature and mean |gate|)."""
    tower = weights.temperatures is not None
    header = ["manager"] + [f"v{v}" for v in weights.vision_layers] + ["top"] + (["tau", "|gate|"] if tower else [])
    lines = []
    for index, (label, kind, row) in enumerate(zip(weights.rows, weights.kinds, weights.values)):
        cells = ["-" if math.isnan(v) else f"{v:.{precision}f}" for v in row]
        finite = [(v, i) for i, v in enumerate(row) if not math.isnan(v)]
        best = max(finite)[1] if finite and max(finite)[0] > 0 else None
        top = f"v{weights.vision_layers[best]}" if best is not None else "-"
        extra = []
        if tower:
            gate = weights.channel_values[index]
            extra = [f"{weights.temperatures[index]:.3f}", f"{sum(abs(v) for v in gate) / len(gate):.{precision}f}"]
        lines.append([label + _ROW_SUFFIX.get(kind, "")] + cells + [top] + extra)
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [render(header), render(["-" * w for w in widths])] + [render(r) for r in lines]
    note = (
        f"{_NOTES.get(weights.manager_type, 'mean |w| over channels')}; {weights.manager_type} Managers, "
        f"injection={weights.injection!r}; columns = SigLIP hidden_states index"
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
    """Write a heatmap (rows: Managers / injection layers, columns: vision layers) of the Manager weights to `path`
    (PNG). Bridge and tower Managers get a second panel below: each Manager's per-channel scale or gate."""
    plt = pyplot()
    import numpy as np

    data = np.array(weights.values, dtype=float)
    masked = np.ma.masked_invalid(data)
    n_rows, n_cols = data.shape
    width = max(4.8, 2.4 + 0.55 * n_cols)
    height = max(2.8, 1.6 + 0.42 * n_rows)
    if weights.channel_values is None:
        figure, axes = plt.subplots(figsize=(width, height), dpi=120)
    else:
        width = max(width, 6.4)
        figure, (axes, channel_axes) = plt.subplots(2, 1, figsize=(width, 2 * height), dpi=120)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")  # grey: no weight (LLM-0 last layer, not bridged)
    vmax = weights.max if weights.max > 0 else 1.0
    image = axes.imshow(masked, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto")
    axes.set_xticks(range(n_cols), [str(v) for v in weights.vision_layers])
    row_labels = _row_labels(weights)
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
    colorbar.set_label("softmax weight (mean over channels)" if weights.temperatures else "mean |w| over channels")
    default_title = f"Manager weights ({weights.manager_type}, injection={weights.injection})"
    axes.set_title(textwrap.fill(title or default_title, 60), fontsize=9)
    if weights.channel_values is not None:
        _plot_channels(channel_axes, figure, weights, row_labels)
    return save_png(figure, path)


def _row_labels(weights: ManagerWeights) -> list[str]:
    labels = [r + _ROW_SUFFIX.get(k, "") for r, k in zip(weights.rows, weights.kinds)]
    if weights.temperatures is not None:
        labels = [f"{label} (tau {t:.2f})" for label, t in zip(labels, weights.temperatures)]
    return labels


def _plot_channels(axes, figure, weights: ManagerWeights, row_labels: list[str]) -> None:
    """Signed per-channel values (bridge: layer_scale; tower: gate), rows: Managers, columns: channels."""
    import numpy as np

    channels = np.array(weights.channel_values, dtype=float)  # (rows, D)
    limit = float(np.abs(channels).max()) or 1.0
    image = axes.imshow(channels, cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    axes.set_yticks(range(channels.shape[0]), row_labels)
    axes.set_xlabel("channel")
    what = "gate" if weights.temperatures is not None else "scale"
    axes.set_title(f"per-channel {what} of each Manager", fontsize=9)
    figure.colorbar(image, ax=axes).set_label(what)


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
