"""The demo's training-loss curves (one PNG, one curve per trained model)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from ..inspect_weights import pyplot, save_png


def _centred_mean(values: list[float], window: int) -> list[float]:
    """Mean over a window centred on each point (shorter at the ends), so the curve does not lag."""
    half = window // 2
    return [
        sum(values[max(0, i - half) : i + half + 1]) / len(values[max(0, i - half) : i + half + 1])
        for i in range(len(values))
    ]


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], path: str | Path, title: str | None = None) -> Path:
    """Write training-loss curves (`{label: [(step, loss), ...]}`) into one PNG."""
    plt = pyplot()

    figure, axes = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, points) in enumerate(curves.items()):
        if not points:
            continue
        steps, losses = zip(*points)
        color = colors[index % len(colors)]
        window = max(1, len(losses) // 40)
        axes.plot(steps, losses, color=color, linewidth=0.6, alpha=0.35)
        smooth_label = label + (f" (mean of {window} steps)" if window > 1 else "")
        axes.plot(steps, _centred_mean(list(losses), window), color=color, linewidth=1.6, label=smooth_label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss (log scale)")
    axes.set_yscale("log")
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

    axes.yaxis.set_major_locator(FixedLocator([m * 10.0**e for e in range(-3, 3) for m in (1, 2, 3, 5)]))
    axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(textwrap.fill(title or "training loss", 80), fontsize=9)
    return save_png(figure, path)
