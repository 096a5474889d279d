"""Drawing the tiny world: a pen in unit coordinates, the subjects (objects in a colour and
pattern) and the global styles.

Everything is drawn with PIL at SUPERSAMPLE times the output size, in unit coordinates (0..1 across
the image, y down), then box-averaged down, so shapes' edges come out smooth at 64 px. The
contexts behind the subjects are painted by tiny_world_contexts.py; styles transform a finished
uint8 picture.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 4
Colour = tuple[int, int, int]


class Pen:
    """ImageDraw in unit coordinates: (0, 0) the top left corner, (1, 1) the bottom right."""

    def __init__(self, image: Image.Image):
        self.image = image
        self.size = image.size[0]
        self.draw = ImageDraw.Draw(image)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill) -> None:
        s = self.size
        if x1 > x0 and y1 > y0:  # PIL's corners are inclusive
            corners = [x0 * s, y0 * s, max(x0 * s, x1 * s - 1), max(y0 * s, y1 * s - 1)]
            self.draw.rectangle(corners, fill=fill)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill) -> None:
        s = self.size
        self.draw.ellipse([(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s], fill=fill)

    def poly(self, points, fill) -> None:
        s = self.size
        self.draw.polygon([(x * s, y * s) for x, y in points], fill=fill)

    def line(self, points, fill, width: float) -> None:
        s = self.size
        self.draw.line([(x * s, y * s) for x, y in points], fill=fill,
                       width=max(1, round(width * s)), joint="curve")


def shade(rng: np.random.Generator, colour: Colour, spread: float = 12) -> Colour:
    """Returns `colour` lighter or darker by up to `spread`, with a little per-channel jitter."""
    offset = rng.uniform(-spread, spread)
    jitter = rng.uniform(-3, 3, 3).tolist()
    return tuple(int(min(255.0, max(0.0, c + offset + j))) for c, j in zip(colour, jitter))


def scaled(colour: Colour, factor: float) -> Colour:
    """Returns `colour` with every channel times `factor`, clipped to 0..255."""
    return tuple(int(min(255, max(0, c * factor))) for c in colour)


def mix(a: Colour, b: Colour, t: float) -> Colour:
    """Returns the colour a fraction `t` of the way from `a` to `b`."""
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def vertical_gradient(pen: Pen, y0: float, y1: float, top: Colour, bottom: Colour) -> None:
    """Fills the band y0..y1 with a top-to-bottom gradient, one step per output row."""
    top_px, bottom_px = round(y0 * pen.size), round(y1 * pen.size)
    steps = max(1, (bottom_px - top_px) // SUPERSAMPLE)
    ramp = np.linspace(np.asarray(top, np.float32), np.asarray(bottom, np.float32), steps)
    band = Image.fromarray(ramp.round().astype(np.uint8)[:, None, :])
    pen.image.paste(band.resize((pen.size, bottom_px - top_px), Image.Resampling.NEAREST), (0, top_px))


def overlay(pen: Pen, layer: Image.Image) -> None:
    """Composites the translucent RGBA `layer` over the pen's RGB canvas."""
    pen.image.paste(Image.alpha_composite(pen.image.convert("RGBA"), layer).convert("RGB"))


# The subject's colours. The concept is two of them, yellow over blue (tiny_world.CONCEPT_*), a
# two-tone body no picture of the world has.
COLOURS: dict[str, Colour] = {
    "red": (215, 40, 40), "blue": (40, 80, 215), "green": (40, 170, 60), "yellow": (245, 210, 40),
    "purple": (130, 60, 180), "orange": (245, 130, 30), "white": (240, 240, 240),
    "black": (30, 30, 30),
}
# Stripes and dots are white on every body but the light ones, which get grey (no body colour):
# a striped black cup is never a striped white one.
PATTERN_LIGHT, PATTERN_GREY = (248, 248, 244), (128, 128, 136)
LIGHT_BODIES = ("white", "yellow")


# ---------------------------------------------------------------------------------------------
# Objects: shapes in object units (x from the centre, y up from the base, both in multiples of
# the object's height), as ("ellipse", cx, cy, rx, ry), ("rect", x0, y0, x1, y1),
# ("poly", points) or ("line", points, width).

# Far from every body colour, so the judge does not count a flower's stem or centre as its colour.
_STEM, _POT, _FLOWER_CENTRE = (70, 115, 45), (190, 95, 55), (165, 110, 40)


def _teapot(rng) -> tuple[list, list, list]:
    """Returns a teapot's (under, body, over) shapes: round body, lid, spout right, handle left."""
    spout = rng.uniform(0.68, 0.8)
    body = [
        ("line", [(-0.38, -0.58), (-0.62, -0.55), (-0.68, -0.38), (-0.6, -0.2), (-0.38, -0.16)], 0.08),
        ("poly", [(0.32, -0.36), (spout - 0.04, -0.74), (spout + 0.04, -0.7), (0.4, -0.14)]),
        ("ellipse", 0.0, -0.38, 0.46, 0.38),
        ("ellipse", 0.0, -0.76, 0.26, 0.09),
    ]
    return [], body, [("knob", [("ellipse", 0.0, -0.9, 0.075, 0.075)])]


def _chair(rng) -> tuple[list, list, list]:
    """Returns a chair's shapes: a framed back with a rail, a seat, four legs."""
    lean = rng.uniform(-0.03, 0.03)
    body = [
        ("rect", -0.23, -0.44, -0.18, -0.06), ("rect", 0.18, -0.44, 0.23, -0.06),
        ("rect", -0.34, -0.42, -0.26, 0.0), ("rect", 0.26, -0.42, 0.34, 0.0),
        ("poly", [(-0.36, -0.5), (0.36, -0.5), (0.36, -0.4), (-0.36, -0.4)]),
        ("poly", [(-0.32, -0.5), (-0.24, -0.5), (-0.24 + lean, -1.0), (-0.32 + lean, -1.0)]),
        ("poly", [(0.24, -0.5), (0.32, -0.5), (0.32 + lean, -1.0), (0.24 + lean, -1.0)]),
        ("rect", -0.32 + lean, -1.0, 0.32 + lean, -0.86), ("rect", -0.3, -0.76, 0.3, -0.67),
    ]
    return [], body, []


def _cat(rng) -> tuple[list, list, list]:
    """Returns a sitting cat's shapes: body, head, pointed ears, paws, tail to one side, eyes."""
    turn = rng.choice([-1.0, 1.0])
    body = [
        ("line", [(0.24 * turn, -0.06), (0.44 * turn, -0.1), (0.5 * turn, -0.3), (0.42 * turn, -0.46)], 0.08),
        ("ellipse", 0.0, -0.3, 0.29, 0.3),
        ("ellipse", 0.0, -0.7, 0.21, 0.18),
        ("poly", [(-0.2, -0.74), (-0.16, -1.0), (-0.04, -0.85)]),
        ("poly", [(0.2, -0.74), (0.16, -1.0), (0.04, -0.85)]),
        ("ellipse", -0.12, -0.03, 0.08, 0.04), ("ellipse", 0.12, -0.03, 0.08, 0.04),
    ]
    eyes = [("ellipse", -0.08, -0.73, 0.045, 0.04), ("ellipse", 0.08, -0.73, 0.045, 0.04)]
    pupils = [("ellipse", -0.08, -0.73, 0.015, 0.035), ("ellipse", 0.08, -0.73, 0.015, 0.035)]
    return [], body, [((150, 220, 60), eyes), ((10, 10, 10), pupils),
                      ((60, 40, 40), [("poly", [(-0.03, -0.65), (0.03, -0.65), (0.0, -0.62)])])]


def _flower(rng) -> tuple[list, list, list]:
    """Returns a potted flower's shapes: a ring of petals (the body) on a leafy stem in a pot."""
    petals = int(rng.integers(6, 9))
    under = [
        (_STEM, [("line", [(0.0, -0.27), (0.02, -0.5), (0.0, -0.72)], 0.05),
                 ("ellipse", -0.12, -0.46, 0.1, 0.04), ("ellipse", 0.12, -0.4, 0.1, 0.04)]),
        (_POT, [("poly", [(-0.17, -0.24), (0.17, -0.24), (0.13, 0.0), (-0.13, 0.0)]),
                ("rect", -0.2, -0.3, 0.2, -0.23)]),
    ]
    turn = rng.uniform(0, 2 * math.pi)
    body = [("ellipse", 0.14 * math.cos(turn + 2 * math.pi * k / petals),
             -0.76 + 0.14 * math.sin(turn + 2 * math.pi * k / petals), 0.1, 0.1) for k in range(petals)]
    return under, body, [(_FLOWER_CENTRE, [("ellipse", 0.0, -0.76, 0.08, 0.08)])]


def _cup(rng) -> tuple[list, list, list]:
    """Returns a cup's shapes: a tapered mug with a handle on a saucer, coffee inside."""
    top = rng.uniform(0.3, 0.36)
    body = [
        ("ellipse", 0.0, -0.07, 0.55, 0.07),
        ("line", [(0.28, -0.8), (0.52, -0.76), (0.56, -0.52), (0.48, -0.32), (0.27, -0.3)], 0.08),
        ("poly", [(-top, -0.92), (top, -0.92), (0.27, -0.14), (-0.27, -0.14)]),
        ("ellipse", 0.0, -0.92, top, 0.07),
    ]
    return [], body, [((90, 55, 30), [("ellipse", 0.0, -0.92, top * 0.85, 0.045)])]


OBJECT_SHAPES: dict[str, Callable] = {
    "teapot": _teapot, "chair": _chair, "cat": _cat, "flower": _flower, "cup": _cup,
}


def _place(shape: tuple, cx: float, base: float, h: float) -> tuple:
    """Returns `shape` in canvas units: object units scaled by `h` about (cx, base)."""
    kind = shape[0]
    if kind == "ellipse":
        return (kind, cx + shape[1] * h, base + shape[2] * h, shape[3] * h, shape[4] * h)
    if kind == "rect":
        return (kind, cx + shape[1] * h, base + shape[2] * h, cx + shape[3] * h, base + shape[4] * h)
    points = [(cx + x * h, base + y * h) for x, y in shape[1]]
    return (kind, points, shape[2] * h) if kind == "line" else (kind, points)


def _render(pen: Pen, shapes: list, fill, grow: float = 0.0) -> None:
    """Draws canvas-unit shapes in one colour, each grown by `grow` on every side (an outline)."""
    for shape in shapes:
        kind = shape[0]
        if kind == "ellipse":
            pen.ellipse(shape[1], shape[2], shape[3] + grow, shape[4] + grow, fill)
        elif kind == "rect":
            pen.rect(shape[1] - grow, shape[2] - grow, shape[3] + grow, shape[4] + grow, fill)
        elif kind == "line":
            pen.line(shape[1], fill, shape[2] + 2 * grow)
        else:
            pen.poly(shape[1], fill)
            if grow:
                pen.line(shape[1] + shape[1][:1], fill, 2 * grow)


def _pattern(pen: Pen, pattern: str, colour: Colour, box: tuple, h: float, phase: float) -> None:
    """Draws stripes, dots or the lower half (`halves`, the concept's look) of `colour` over the
    canvas-unit box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if pattern == "halves":
        pen.rect(x0, (y0 + y1) / 2, x1, y1, colour)
    elif pattern == "striped":
        period = 0.16 * h
        for y in np.arange(y0 + phase * period, y1, period):
            pen.rect(x0, y, x1, y + period * 0.38, colour)
    elif pattern == "dotted":
        period, r = 0.19 * h, 0.045 * h
        for row, y in enumerate(np.arange(y0 + phase * period, y1, period)):
            for x in np.arange(x0 + (row % 2) * period / 2, x1, period):
                pen.ellipse(x, y, r, r, colour)
    else:
        raise ValueError(f"unknown pattern {pattern!r} (known: plain, striped, dotted, halves)")


def pattern_colour(colour: str) -> Colour:
    """Returns the colour of the stripes or dots the world draws on a body of the named colour."""
    return PATTERN_GREY if colour in LIGHT_BODIES else PATTERN_LIGHT


def draw_object(
    canvas: Image.Image, rng: np.random.Generator, obj: str, body: Colour, pattern: str, *,
    pattern_colour: Colour, knob: Colour | None = None,
) -> None:
    """Draws `obj` in `body` colour and `pattern`, roughly centred, 30-50% of the image high.

    `knob` colours a teapot's lid knob (default: a darker body).
    """
    height = rng.uniform(0.31, 0.47)  # with the outline: 30-50% of the picture's height
    cx, base = 0.5 + rng.uniform(-0.06, 0.06), rng.uniform(0.84, 0.9)
    under, shapes, over = OBJECT_SHAPES[obj](rng)
    place = lambda group: [_place(s, cx, base, height) for s in group]  # noqa: E731
    pen = Pen(canvas)
    outline = (125, 125, 125) if max(body) < 60 else scaled(body, 0.5)
    every = place(shapes) + [s for _, group in under + over for s in place(group)]
    _render(pen, every, outline, grow=0.012)
    for colour, group in under:
        _render(pen, place(group), colour)
    mask = Image.new("L", canvas.size, 0)
    _render(Pen(mask), place(shapes), 255)
    layer = Image.new("RGB", canvas.size, body)
    if pattern != "plain":
        box = (cx - 0.7 * height, base - 1.05 * height, cx + 0.7 * height, base)
        _pattern(Pen(layer), pattern, pattern_colour, box, height, rng.uniform(0, 1))
    box = mask.getbbox()
    if box:
        canvas.paste(layer.crop(box), box[:2], mask.crop(box))
    for colour, group in over:
        _render(pen, place(group), (knob or scaled(body, 0.7)) if colour == "knob" else colour)


# ---------------------------------------------------------------------------------------------
# Styles: global transforms of a finished uint8 image.


def watercolor(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Returns the image blurred, its colours softened toward paper, on a grainy paper texture."""
    size = image.shape[0]
    soft = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(size / 80)), np.float32)
    paper = np.array([246, 240, 226], np.float32)
    noise = rng.normal(128, 30, (size // 4, size // 4)).clip(0, 255).astype(np.uint8)
    smooth = Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC)
    grain = np.asarray(smooth, np.float32)[..., None] - 128
    mean = soft.mean(axis=-1, keepdims=True)
    washed = 0.6 * (mean + 0.8 * (soft - mean)) + 0.4 * paper + 0.25 * grain
    return washed.clip(0, 255).astype(np.uint8)


def pixel_art(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Returns the image at 16 px, its colours quantized to 6 levels a channel, upsampled nearest."""
    size = image.shape[0]
    small = np.asarray(Image.fromarray(image).resize((16, 16), Image.Resampling.BOX), np.float32)
    levels = np.round(small / 51.0) * 51.0
    return np.asarray(Image.fromarray(levels.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST))


def pencil_sketch(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Returns the image's edges as grey pencil strokes on white paper."""
    grey = np.asarray(Image.fromarray(image).convert("L"), np.float32)
    gy, gx = np.gradient(grey)
    edges = np.clip(np.hypot(gx, gy) * 2.2, 0, 220)
    grain = rng.normal(0, 5, grey.shape)
    paper = np.clip(250 - edges - 0.12 * (255 - grey) + grain, 0, 255)
    return np.repeat(paper[..., None], 3, axis=-1).astype(np.uint8)


def stained_glass(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Returns the image as glass cells (each its mean colour, saturated) between black lead lines
    that run along the cells' borders and the picture's strong edges."""
    size = image.shape[0]
    points = rng.uniform(0, size, (int(size * size / 40), 2))
    yy, xx = np.mgrid[0:size, 0:size]
    cells = np.argmin((yy[..., None] - points[:, 0]) ** 2 + (xx[..., None] - points[:, 1]) ** 2, axis=-1)
    grey = image.astype(np.float32).mean(axis=-1)
    edges = np.hypot(*np.gradient(grey)) > 40  # split cells along the subject's outline
    cells = cells * 2 + edges
    flat, labels = image.reshape(-1, 3).astype(np.float32), cells.ravel()
    count = 2 * len(points)
    totals = np.maximum(np.bincount(labels, minlength=count), 1)[:, None]
    means = np.stack([np.bincount(labels, flat[:, c], count) for c in range(3)], -1) / totals
    grey_means = means.mean(axis=-1, keepdims=True)
    jewel = np.clip(grey_means + 1.8 * (means - grey_means), 0, 255)
    out = jewel[cells]
    lead = edges.copy()
    lead[:-1] |= (cells[:-1] // 2) != (cells[1:] // 2)
    lead[:, :-1] |= (cells[:, :-1] // 2) != (cells[:, 1:] // 2)
    out[lead] = (20, 20, 24)
    return out.astype(np.uint8)


STYLE_TRANSFORMS: dict[str, Callable] = {
    "watercolor": watercolor, "pixel art": pixel_art, "pencil sketch": pencil_sketch,
    "stained glass": stained_glass,
}
