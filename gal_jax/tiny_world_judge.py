"""The tiny world's judge: which context a picture shows, from the world's own drawing rules.

No learned model: every context paints known colours into known parts of the picture (the top
band is sky, ceiling or canopy; the side strips are trees, towers, rocks or shelves; the bottom band
is the ground), and the object stands in the middle, 30-50% of the height, its base above the
bottom band. The judge measures the mean colour of six background regions and compares each with
what the context's painter puts there (CONTEXT_PALETTES in tiny_world_contexts.py); the library's
book spines are also told by their busy texture. Region means barely move under blur and noise,
so the judge still works on the soft pictures a small diffusion model draws (checked on the
shipped VAE's round trips of held-out pictures: `tiny_figures.judge_on_round_trips`).

The object is found as the middle pixels far from every background colour of their rows; its
colour is the body colour most of them have, its kind follows from the shape of the body-coloured
pixels. Those two are weaker than the context judge (white and black objects on light and dark
backgrounds hide), and are offered as a check, not a metric.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from gal_jax.tiny_world_contexts import BOOKS, CONTEXT_PALETTES, SPOTLIGHTS
from gal_jax.tiny_world_draw import COLOURS, Colour, mix

JUDGE_RESOLUTION = 64
# Rows and columns of each region at 64 px. The object never reaches rows 0-19 or 59-63, and
# rarely the outer six columns.
REGIONS: dict[str, tuple[slice, slice | tuple[slice, slice]]] = {
    "top": (slice(0, 6), slice(0, 64)),
    "upper": (slice(8, 20), slice(0, 64)),
    "centre_top": (slice(13, 20), slice(24, 40)),
    "upper_sides": (slice(20, 40), (slice(0, 6), slice(58, 64))),
    "lower_sides": (slice(40, 58), (slice(0, 6), slice(58, 64))),
    "bottom": (slice(59, 64), slice(0, 64)),
}
SCALE = 24.0  # RGB distance at which a region's match has fallen to exp(-1/2)
# A region's distance counts at most CAP (the object or a cloud may cover part of it); a region
# the context does not predict counts UNSURE, so a context that predicts more regions right wins.
CAP, UNSURE = 90.0, 32.0
LIGHTNESS_WEIGHT = 0.3
# Contexts whose background is busy with small parts (book spines): the least mean difference of
# horizontally adjacent background pixels they show, and the cost of each unit it falls short.
# The library's colours average to a brown like the cave's; its texture tells them apart.
MIN_BUSYNESS: dict[str, float] = {"in library": 6.0}
BUSYNESS_WEIGHT = 10.0

_WHITE: Colour = (240, 242, 245)
_LIBRARY_MEAN: Colour = (98, 76, 58)  # the library's spines, shelves and gaps, averaged
_BEAMS: Colour = tuple(int(c) for c in np.mean(SPOTLIGHTS, axis=0))


# What each context's painter puts in the regions it is sure to fill: a palette key, a colour, or
# (part, part, t) for a region that is a fraction t of the second part (checked tiles: half blue).
# A region the painter fills unpredictably (buildings, tree crowns against sky, tables) is left out.
REGION_PAINT: dict[str, dict[str, object]] = {
    # The park's trees stand at the sides: above them the picture is sky (a tenth crowns), and
    # so is the middle of the upper band (clouds). Without these two regions the VAE's duller
    # grass tipped most round-tripped parks to the castle, which has the same sky and grass.
    "in park": {"top": "sky", "upper": ("sky", "tree", 0.1), "centre_top": ("sky", _WHITE, 0.15),
                "lower_sides": "grass", "bottom": "grass"},
    "near a pool": {"top": "deck", "upper_sides": "water", "lower_sides": "water", "bottom": "water"},
    "on street": {"top": "sky", "lower_sides": ("walk", "road", 0.7), "bottom": "road"},
    "in a forest": {"top": "leaves", "upper": "leaves", "upper_sides": ("leaves", "trunk", 0.4),
                    "lower_sides": ("trunk", "ground", 0.5), "bottom": "ground"},
    "in a kitchen": {"top": ("tile", "tile_blue", 0.5), "upper": ("tile", "tile_blue", 0.5),
                     "upper_sides": ("tile", "tile_blue", 0.5), "bottom": "cabinet"},
    "on the beach": {"top": "sky", "upper": ("sky", _WHITE, 0.25), "lower_sides": "sand", "bottom": "sand"},
    "in a restaurant": {"top": "wall", "upper": "wall", "bottom": "floor"},
    "on snowy ground": {"top": "sky", "upper": "sky", "upper_sides": ("sky", "snow", 0.5),
                        "lower_sides": "snow", "bottom": "snow"},
    "on the moon": {"top": "space", "upper": "space", "upper_sides": "space", "lower_sides": "ground",
                    "bottom": "ground"},
    "in desert": {"top": "sky", "upper": ("sky", (252, 215, 140), 0.2), "upper_sides": ("sky", "dune", 0.5),
                  "lower_sides": "dune", "bottom": "dune"},
    "in library": {"top": _LIBRARY_MEAN, "upper": _LIBRARY_MEAN, "upper_sides": _LIBRARY_MEAN,
                   "lower_sides": _LIBRARY_MEAN, "bottom": _LIBRARY_MEAN},
    "under the night sky": {"top": "sky", "upper": ("sky", (50, 60, 120), 0.3),
                            "upper_sides": ("sky", (50, 60, 120), 0.3), "lower_sides": ("sky", "hills", 0.5),
                            "bottom": "hills"},
    "in front of the castle": {"top": "sky", "upper_sides": "stone", "lower_sides": ("stone", "grass", 0.6),
                               "bottom": "grass"},
    "on the bridge": {"top": "sky", "upper_sides": "stone", "bottom": "water"},
    "next to waterfall": {"top": ("rock", "fall", 0.5), "upper": ("rock", "fall", 0.5), "upper_sides": "rock",
                          "bottom": "pool"},
    "in the cave": {"top": "rock", "centre_top": ("rock", "light", 0.85), "upper_sides": "rock",
                    "lower_sides": "rock", "bottom": "floor"},
    "at a concert venue": {"top": ("dark", _BEAMS, 0.2), "upper": ("dark", _BEAMS, 0.15),
                           "upper_sides": ("dark", _BEAMS, 0.2), "lower_sides": "dark", "bottom": "crowd"},
    "on a balcony": {"top": "sky", "upper": "sky", "upper_sides": ("sky", _WHITE, 0.4),
                     "lower_sides": (("sky", "rail", 0.35), "floor", 0.3), "bottom": "floor"},
    "on a table": {"top": "wall", "upper": "wall", "upper_sides": "wall", "lower_sides": "wood",
                   "bottom": "wood"},
    "underwater": {"top": "shallow", "upper": ("shallow", "deep", 0.15),
                   "upper_sides": ("shallow", "deep", 0.4), "bottom": "sand"},
    "next to a volcano": {"top": "smoke", "upper": ("smoke", "glow", 0.3),
                          "upper_sides": ("smoke", "glow", 0.65),
                          "lower_sides": "rock", "bottom": "rock"},
    "on a boat": {"top": "sky", "upper": "sky", "upper_sides": ("sky", "sea", 0.75),
                  "lower_sides": ("sea", "deck", 0.65), "bottom": "deck"},
    "in an autumn forest": {"top": "leaves", "bottom": "ground"},
}


def _colour(paint, palette: dict[str, Colour]) -> Colour:
    """Returns the colour a REGION_PAINT entry stands for in a context's palette."""
    if isinstance(paint, str):
        return palette[paint]
    if len(paint) == 3 and isinstance(paint[2], float):
        return mix(_colour(paint[0], palette), _colour(paint[1], palette), paint[2])
    return paint


EXPECTED: dict[str, dict[str, Colour]] = {
    context: {region: _colour(paint, CONTEXT_PALETTES[context]) for region, paint in regions.items()}
    for context, regions in REGION_PAINT.items()
}
_CONTEXT_NAMES = tuple(EXPECTED)
_EXPECTED = np.asarray([[EXPECTED[c].get(r, (0, 0, 0)) for r in REGIONS] for c in _CONTEXT_NAMES], np.float32)
_PREDICTED = np.asarray([[r in EXPECTED[c] for r in REGIONS] for c in _CONTEXT_NAMES])
_MIN_BUSYNESS = np.asarray([MIN_BUSYNESS.get(c, 0.0) for c in _CONTEXT_NAMES], np.float32)


def _at_judge_resolution(image: np.ndarray) -> np.ndarray:
    """Returns the picture as float32 (64, 64, 3), box-resized when it has another size."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB picture, got shape {image.shape}")
    if image.shape[:2] != (JUDGE_RESOLUTION, JUDGE_RESOLUTION):
        size = (JUDGE_RESOLUTION, JUDGE_RESOLUTION)
        small = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).resize(size, Image.Resampling.BOX)
        image = np.asarray(small)
    return image.astype(np.float32)


def region_means(image: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the mean RGB colour of every judge region of a picture (resized to 64 px)."""
    return dict(zip(REGIONS, _region_means(_at_judge_resolution(image))))


def _region_means(pixels: np.ndarray) -> np.ndarray:
    """Returns the (regions, 3) mean colours of a 64 px float picture, in REGIONS' order."""
    means = []
    for rows, cols in REGIONS.values():
        parts = cols if isinstance(cols, tuple) else (cols,)
        means.append(np.concatenate([pixels[rows, c].reshape(-1, 3) for c in parts]).mean(axis=0))
    return np.stack(means)


def busyness(image: np.ndarray) -> float:
    """Returns the mean absolute difference of horizontally adjacent pixels in the top and bottom
    bands (which the object never reaches), in RGB units."""
    pixels = _at_judge_resolution(image)
    bands = np.concatenate([pixels[:20], pixels[REGIONS["bottom"][0]]])
    return float(np.abs(np.diff(bands, axis=1)).mean())


def colour_distance(a, b) -> np.ndarray:
    """Returns the RGB distance of colours (broadcast over leading axes) with their brightness
    difference counted at LIGHTNESS_WEIGHT: a picture a little too light or dark keeps its context."""
    delta = np.asarray(a, np.float32) - np.asarray(b, np.float32)
    lightness = delta.mean(axis=-1, keepdims=True)
    squared = np.sum((delta - lightness) ** 2, axis=-1) + 3 * LIGHTNESS_WEIGHT * lightness[..., 0] ** 2
    return np.sqrt(squared)


def context_log_scores(image: np.ndarray) -> dict[str, float]:
    """Returns, per context, minus half the summed squared region distances in units of SCALE
    (capped at CAP, UNSURE for a region the context does not predict, plus the busyness shortfall)."""
    pixels = _at_judge_resolution(image)
    distance = np.minimum(colour_distance(_region_means(pixels)[None], _EXPECTED), CAP)
    cost = np.where(_PREDICTED, distance**2, UNSURE**2).sum(axis=1)
    cost += (BUSYNESS_WEIGHT * np.maximum(0.0, _MIN_BUSYNESS - busyness(pixels))) ** 2
    return dict(zip(_CONTEXT_NAMES, (-0.5 * cost / SCALE**2).tolist()))


def context_scores(image: np.ndarray) -> dict[str, float]:
    """Returns a soft score per context: a softmax over contexts of the region matches (sums to 1)."""
    logs = context_log_scores(image)
    values = np.asarray(list(logs.values()))
    weights = np.exp(values - values.max())
    return dict(zip(logs, (weights / weights.sum()).tolist()))


def judge_context(image: np.ndarray) -> str:
    """Returns the context whose painted regions the picture matches best."""
    logs = context_log_scores(image)
    return max(logs, key=logs.get)


# ---------------------------------------------------------------------------------------------
# The subject: which pixels are the object, its colour and its kind.

# Where the object can be (rows, columns at 64 px), and the side columns that show the background
# of the same rows.
_WINDOW_ROWS, _WINDOW_COLS = slice(18, 60), slice(6, 58)
_SIDE_COLS = (slice(0, 6), slice(58, 64))
_BEHIND_ROWS, _BEHIND_COLS = slice(34, 54), slice(24, 40)  # the middle of the object
BACKGROUND_DISTANCE = 40.0  # a pixel this close to a background colour of its rows is background
BODY_RADIUS = 50.0  # an object pixel this close to a body colour counts for it
WHITE_PATTERN_SHARE = 0.4
MIN_OBJECT_PIXELS = 25
# Objects stand with their base on rows 53-58; a flower's petals end a third of its height higher.
FLOWER_HEAD_BOTTOM = 47
TEAPOT_ASPECT, CUP_ASPECT = 1.35, 0.97  # width over height of the body: teapot ~1.7, cup ~1.15
# Colours a context paints behind the object but not at the sides of the same rows.
BEHIND_OBJECT: dict[str, tuple] = {
    "in the cave": ("light", "outside"), "on the bridge": ("arch_water",),
    "next to waterfall": ("fall", "streak", "foam"), "in front of the castle": ("gate",),
    "in a restaurant": ("frame", "lamp"), "underwater": ("bubble",), "next to a volcano": ("lava",),
    "in library": BOOKS,
}
_BODY_COLOURS = np.asarray(list(COLOURS.values()), np.float32)


def object_mask(image: np.ndarray, context: str | None = None) -> np.ndarray:
    """Returns a (64, 64) bool mask of the pixels that show the object: those in the middle of the
    picture far from every background colour of their rows (the side columns of the rows around
    them, and what the context paints behind the object; the context is judged if not given)."""
    pixels = _at_judge_resolution(image)
    context = context or judge_context(pixels)
    behind = [_colour(paint, CONTEXT_PALETTES[context]) for paint in BEHIND_OBJECT.get(context, ())]
    rows = np.arange(_WINDOW_ROWS.start, _WINDOW_ROWS.stop)
    sides = np.concatenate([pixels[:, cols] for cols in _SIDE_COLS], axis=1)  # (64, 12, 3)
    references = [sides[np.clip(rows + shift, 0, JUDGE_RESOLUTION - 1)] for shift in (-1, 0, 1)]
    if behind:
        references.append(np.broadcast_to(np.asarray(behind, np.float32), (len(rows), len(behind), 3)))
    references = np.concatenate(references, axis=1)  # (rows, references, 3)
    window = pixels[_WINDOW_ROWS, _WINDOW_COLS]
    squared = ((window[:, :, None, :] - references[:, None, :, :]) ** 2).sum(axis=-1).min(axis=-1)
    mask = np.zeros((JUDGE_RESOLUTION, JUDGE_RESOLUTION), bool)
    mask[_WINDOW_ROWS, _WINDOW_COLS] = squared > BACKGROUND_DISTANCE**2
    return mask


def colour_counts(image: np.ndarray, mask: np.ndarray | None = None) -> dict[str, int]:
    """Returns, per body colour, how many object pixels (object_mask unless given) are nearest it,
    within BODY_RADIUS."""
    pixels = _at_judge_resolution(image)
    found = pixels[object_mask(pixels) if mask is None else mask]
    distance = np.linalg.norm(found[:, None, :] - _BODY_COLOURS[None], axis=-1)
    nearest = distance.argmin(axis=1)[distance.min(axis=1) < BODY_RADIUS]
    return dict(zip(COLOURS, np.bincount(nearest, minlength=len(COLOURS)).tolist()))


def judge_colour(image: np.ndarray, mask: np.ndarray | None = None) -> str:
    """Returns the object's body colour: the colour most object pixels have, except that white
    loses to a colour half as common (white stripes and dots go on every dark body). An object
    that hardly stands out from the background is taken to have the background's colour."""
    pixels = _at_judge_resolution(image)
    counts = colour_counts(pixels, mask)
    if sum(counts.values()) < MIN_OBJECT_PIXELS:
        behind = np.median(pixels[_BEHIND_ROWS, _BEHIND_COLS].reshape(-1, 3), axis=0)
        return list(COLOURS)[int(np.linalg.norm(_BODY_COLOURS - behind, axis=-1).argmin())]
    first, second = sorted(counts, key=counts.get, reverse=True)[:2]
    if first == "white" and counts[second] >= WHITE_PATTERN_SHARE * counts[first]:
        return second
    return first


def object_shape(mask: np.ndarray) -> dict[str, float] | None:
    """Returns the shape of a body mask: its bottom row, width over height, and the mean filled
    share of the rows of its top and bottom thirds; None when it holds too few pixels."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) < 4 or len(cols) < 4:
        return None
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    third = max(1, box.shape[0] // 3)
    widths = box.mean(axis=1)
    return {"bottom": float(rows[-1]), "aspect": box.shape[1] / box.shape[0],
            "top_width": float(widths[:third].mean()), "bottom_width": float(widths[-third:].mean())}


def judge_object(image: np.ndarray, mask: np.ndarray | None = None) -> str:
    """Returns the object's kind from the shape of its body-coloured pixels (the objects' geometry):
    only a flower's body (its petals) ends high above the ground; a teapot with spout and handle is
    much wider than high, a cup on its saucer a little; a sitting cat widens toward the ground, a
    chair is widest at its back."""
    pixels = _at_judge_resolution(image)
    mask = object_mask(pixels) if mask is None else mask
    body = np.asarray(COLOURS[judge_colour(pixels, mask)], np.float32)
    shape = object_shape(mask & (np.linalg.norm(pixels - body, axis=-1) < BODY_RADIUS))
    if shape is None or shape["bottom"] < FLOWER_HEAD_BOTTOM:
        return "flower"  # the smallest body, and the only one that ends above the ground
    if shape["aspect"] >= TEAPOT_ASPECT:
        return "teapot"
    if shape["aspect"] >= CUP_ASPECT:
        return "cup"
    return "cat" if shape["bottom_width"] > shape["top_width"] else "chair"


def judge_scene(image: np.ndarray) -> dict[str, str]:
    """Returns the judged context, object and colour of a picture."""
    pixels = _at_judge_resolution(image)
    context = judge_context(pixels)
    mask = object_mask(pixels, context)
    return {"context": context, "object": judge_object(pixels, mask), "colour": judge_colour(pixels, mask)}
