"""Drawing one filled shape with PIL: the colours, the shapes and the pen, shared by the synthetic training data
(`synthetic.py`) and the demo's data (`llava_manager.demo.shapes`)."""

from __future__ import annotations

#: every colour and shape name is a word of the tiny tokenizer (`tiny.py`)
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (225, 205, 40)}
SHAPES = ("circle", "square", "triangle")


def fill_shape(pen, shape: str, left: float, top: float, side: float, fill: tuple[int, int, int]) -> None:
    """Draw `shape` filling the square box (`left`, `top`, `side`) with `pen` (a `PIL.ImageDraw.Draw`); the
    triangle stands on the box's bottom edge with its apex at the top centre."""
    box = (left, top, left + side, top + side)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "triangle":
        pen.polygon([(left + side / 2, top), (left, top + side), (left + side, top + side)], fill=fill)
    else:
        raise ValueError(f"shape={shape!r} is not one of {SHAPES}")
