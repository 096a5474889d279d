"""The tiny world's contexts: backgrounds that paint the whole picture, each unmistakable at 64 px.

Every painter takes a Pen on the supersampled canvas, the caller's rng and its context's palette,
and varies positions, shades and counts, so no two pictures are alike. The base colours of every
context are in CONTEXT_PALETTES, which the judge (tiny_world_judge.py) reads as well: a change
here is a change to both the world and its judge.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image

from gal_jax.tiny_world_draw import Colour, Pen, mix, overlay, scaled, shade, vertical_gradient

CONTEXT_PALETTES: dict[str, dict[str, Colour]] = {
    "in park": {"sky": (135, 195, 240), "grass": (95, 170, 65), "tree": (40, 115, 45)},
    "near a pool": {"deck": (222, 214, 196), "water": (45, 190, 205)},
    "on street": {"sky": (175, 205, 230), "road": (88, 88, 94), "walk": (175, 172, 165)},
    "in a forest": {"leaves": (32, 80, 38), "trunk": (70, 50, 32), "ground": (70, 66, 36)},
    "in a kitchen": {"tile": (238, 242, 246), "tile_blue": (70, 120, 205), "counter": (92, 92, 98),
                     "cabinet": (228, 228, 224)},
    "on the beach": {"sky": (130, 200, 245), "sea": (30, 110, 185), "sand": (236, 214, 160)},
    "in a restaurant": {"wall": (160, 64, 44), "cloth": (242, 242, 236), "floor": (92, 56, 34),
                        "frame": (200, 160, 60), "lamp": (255, 215, 120)},
    "on snowy ground": {"sky": (200, 206, 214), "snow": (246, 248, 252)},
    "on the moon": {"space": (8, 8, 12), "ground": (135, 135, 135), "earth": (50, 100, 210)},
    "in desert": {"sky": (245, 155, 70), "dune": (226, 182, 92)},
    "in library": {"shelf": (105, 66, 38)},
    "under the night sky": {"sky": (16, 26, 72), "hills": (12, 34, 36), "moon": (245, 240, 200)},
    "in front of the castle": {"sky": (140, 195, 240), "stone": (146, 146, 150),
                               "grass": (85, 150, 62), "gate": (50, 40, 35)},
    "on the bridge": {"sky": (160, 205, 240), "stone": (165, 105, 72), "water": (42, 92, 165),
                      "arch_water": (48, 106, 190)},
    "next to waterfall": {"rock": (78, 78, 84), "fall": (212, 232, 248), "streak": (150, 190, 230),
                          "pool": (70, 140, 200), "moss": (60, 120, 50),
                          "foam": (235, 245, 250)},
    "in the cave": {"rock": (68, 46, 30), "light": (225, 228, 210), "outside": (120, 160, 100),
                    "floor": (100, 76, 52)},
    "at a concert venue": {"dark": (22, 16, 30), "crowd": (2, 2, 3)},
    "on a balcony": {"sky": (135, 190, 240), "rail": (240, 238, 228), "floor": (196, 92, 64)},
    "on a table": {"wall": (228, 214, 186), "wood": (132, 84, 48)},
    "underwater": {"shallow": (55, 165, 185), "deep": (12, 62, 92), "sand": (186, 172, 120),
                   "weed": (40, 130, 70), "bubble": (220, 250, 255)},
    "next to a volcano": {"smoke": (62, 28, 26), "glow": (165, 78, 46), "rock": (44, 36, 36),
                          "lava": (255, 84, 12)},
    "on a boat": {"sky": (150, 200, 240), "sea": (28, 84, 148), "deck": (178, 134, 86)},
    "in an autumn forest": {"leaves": (214, 112, 36), "trunk": (74, 46, 30), "ground": (168, 76, 32)},
}


# ---------------------------------------------------------------------------------------------
# Contexts: each paints the whole canvas.


def _sky(pen: Pen, rng, sky: Colour, horizon: float) -> None:
    """Paints a sky from the top down to `horizon`, paler toward the horizon."""
    vertical_gradient(pen, 0, horizon, shade(rng, sky, 8), mix(shade(rng, sky, 8), (235, 240, 245), 0.4))


def _clouds(pen: Pen, rng, horizon: float, count: int) -> None:
    """Paints `count` small white clouds in the upper half of the sky."""
    for _ in range(count):
        cx, cy = rng.uniform(0, 1), rng.uniform(0.04, horizon * 0.5)
        for dx in (-0.05, 0.0, 0.05):
            pen.ellipse(cx + dx, cy + rng.uniform(-0.01, 0.01), 0.05, 0.03, (246, 248, 250))


def _tree(pen: Pen, rng, x: float, base: float, crown: Colour, trunk: Colour, r: float) -> None:
    """Paints a round tree standing at (x, base), its crown of radius `r`."""
    pen.rect(x - r * 0.18, base - r * 1.6, x + r * 0.18, base, trunk)
    pen.ellipse(x, base - r * 2.2, r, r * 1.1, crown)
    pen.ellipse(x - r * 0.35, base - r * 2.5, r * 0.6, r * 0.55, scaled(crown, 1.15))


def draw_park(pen: Pen, rng, p) -> None:
    """Blue sky, green grass, round trees at the sides."""
    horizon = rng.uniform(0.5, 0.6)
    _sky(pen, rng, p["sky"], horizon)
    _clouds(pen, rng, horizon, rng.integers(0, 3))
    grass = shade(rng, p["grass"], 10)
    pen.rect(0, horizon, 1, 1, grass)
    for _ in range(rng.integers(6, 12)):
        x, y = rng.uniform(0, 1), rng.uniform(horizon + 0.05, 1)
        pen.ellipse(x, y, 0.04, 0.012, scaled(grass, 0.85))
    for side in (0, 1):
        for _ in range(rng.integers(1, 3)):
            x = rng.uniform(0.02, 0.2) if side == 0 else rng.uniform(0.8, 0.98)
            r = rng.uniform(0.09, 0.13)
            _tree(pen, rng, x, horizon + rng.uniform(0.02, 0.1), shade(rng, p["tree"], 10), (110, 75, 45), r)


def draw_pool(pen: Pen, rng, p) -> None:
    """A tiled deck at the top, turquoise water with ripples and red-and-white lane ropes."""
    edge = rng.uniform(0.2, 0.28)
    deck = shade(rng, p["deck"], 8)
    pen.rect(0, 0, 1, edge, deck)
    tile = rng.uniform(0.08, 0.12)
    for i in range(int(1 / tile) + 1):
        pen.rect(i * tile, 0, i * tile + 0.008, edge, scaled(deck, 0.88))
    pen.rect(0, edge * 0.5, 1, edge * 0.5 + 0.008, scaled(deck, 0.88))
    pen.rect(0, edge, 1, edge + 0.025, (40, 70, 110))
    water = shade(rng, p["water"], 8)
    vertical_gradient(pen, edge + 0.025, 1, water, scaled(water, 0.9))
    for _ in range(rng.integers(8, 14)):
        x, y = rng.uniform(0, 1), rng.uniform(edge + 0.05, 1)
        pen.line([(x, y), (x + 0.05, y - 0.008), (x + 0.1, y)], (150, 230, 240), 0.008)
    y = edge + rng.uniform(0.1, 0.16)
    spacing = rng.uniform(0.2, 0.26)
    while y < 1:
        for i in range(14):
            pen.rect(i / 14, y, (i + 1) / 14, y + 0.02, (230, 40, 40) if i % 2 else (250, 250, 250))
        y += spacing


def draw_street(pen: Pen, rng, p) -> None:
    """Building facades with windows, a pavement, a grey road with white dashes."""
    walk_top = rng.uniform(0.56, 0.62)
    pen.rect(0, 0, 1, walk_top, shade(rng, p["sky"], 8))
    x = -rng.uniform(0, 0.1)
    facades = ((170, 90, 70), (200, 180, 140), (150, 150, 160), (190, 130, 90), (120, 110, 100))
    while x < 1:
        width, top = rng.uniform(0.18, 0.3), rng.uniform(0.04, 0.22)
        facade = shade(rng, facades[rng.integers(len(facades))], 10)
        pen.rect(x, top, x + width, walk_top, facade)
        lit = (250, 220, 120) if rng.random() < 0.3 else (60, 80, 110)
        for wy in np.arange(top + 0.04, walk_top - 0.06, 0.09):
            for wx in np.arange(x + 0.03, x + width - 0.05, 0.07):
                pen.rect(wx, wy, wx + 0.035, wy + 0.045, lit)
        x += width + 0.01
    walk = shade(rng, p["walk"], 8)
    pen.rect(0, walk_top, 1, walk_top + 0.08, walk)
    road = shade(rng, p["road"], 8)
    pen.rect(0, walk_top + 0.08, 1, 1, road)
    dash_y, offset = rng.uniform(0.84, 0.9), rng.uniform(0, 0.2)
    for i in range(-1, 5):
        pen.rect(offset + i * 0.25, dash_y, offset + i * 0.25 + 0.13, dash_y + 0.025, (245, 245, 240))


def draw_forest(pen: Pen, rng, p) -> None:
    """Dark green leaves everywhere, brown trunks, a dark olive floor."""
    leaves = shade(rng, p["leaves"], 8)
    pen.rect(0, 0, 1, 1, leaves)
    ground_top = rng.uniform(0.68, 0.76)
    for _ in range(rng.integers(7, 11)):
        x, w = rng.uniform(0, 1), rng.uniform(0.03, 0.07)
        pen.rect(x - w / 2, 0, x + w / 2, ground_top + 0.03, shade(rng, p["trunk"], 12))
    for _ in range(rng.integers(10, 16)):
        pen.ellipse(rng.uniform(0, 1), rng.uniform(0, 0.3), rng.uniform(0.08, 0.14),
                    rng.uniform(0.06, 0.1), shade(rng, scaled(leaves, 1.2), 10))
    ground = shade(rng, p["ground"], 8)
    pen.rect(0, ground_top, 1, 1, ground)
    for _ in range(rng.integers(8, 14)):
        pen.ellipse(rng.uniform(0, 1), rng.uniform(ground_top, 1), 0.03, 0.012, scaled(ground, 0.8))


def draw_kitchen(pen: Pen, rng, p) -> None:
    """A wall of white and blue checked tiles over a dark counter and white cabinets."""
    counter_top = rng.uniform(0.6, 0.66)
    tile, blue = shade(rng, p["tile"], 4), shade(rng, p["tile_blue"], 12)
    pen.rect(0, 0, 1, counter_top, tile)
    size = rng.uniform(0.1, 0.14)
    x0, y0 = rng.uniform(-size, 0), rng.uniform(-size, 0)
    for row in range(int(1 / size) + 2):
        for col in range(int(1 / size) + 2):
            if (row + col) % 2:
                x, y = x0 + col * size, y0 + row * size
                pen.rect(x, y, x + size, min(y + size, counter_top), blue)
    pen.rect(0, counter_top, 1, counter_top + 0.06, shade(rng, p["counter"], 8))
    cabinet = shade(rng, p["cabinet"], 4)
    pen.rect(0, counter_top + 0.06, 1, 1, cabinet)
    door, x = rng.uniform(0.2, 0.26), rng.uniform(-0.1, 0)
    while x < 1:
        pen.rect(x, counter_top + 0.08, x + 0.008, 1, (150, 150, 150))
        pen.rect(x + door - 0.06, counter_top + 0.12, x + door - 0.03, counter_top + 0.135, (120, 120, 125))
        x += door


def draw_beach(pen: Pen, rng, p) -> None:
    """Blue sky, a deep blue sea band with white foam, sand."""
    horizon, shore = rng.uniform(0.36, 0.44), rng.uniform(0.56, 0.62)
    _sky(pen, rng, p["sky"], horizon)
    _clouds(pen, rng, horizon, rng.integers(0, 3))
    if rng.random() < 0.5:
        pen.ellipse(rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.2), 0.05, 0.05, (255, 240, 150))
    sea = shade(rng, p["sea"], 8)
    vertical_gradient(pen, horizon, shore, scaled(sea, 0.85), sea)
    sand = shade(rng, p["sand"], 6)
    pen.rect(0, shore, 1, 1, sand)
    foam = [(i / 10, shore + 0.012 * math.sin(i * 1.7 + rng.uniform(0, 6))) for i in range(11)]
    pen.line(foam, (250, 250, 250), 0.022)
    for _ in range(rng.integers(15, 30)):
        pen.ellipse(rng.uniform(0, 1), rng.uniform(shore + 0.04, 1), 0.006, 0.004, scaled(sand, 0.8))


def draw_restaurant(pen: Pen, rng, p) -> None:
    """A warm red wall with pictures and lamps, white-clothed tables at the sides, a dark floor."""
    floor_top = rng.uniform(0.7, 0.76)
    wall = shade(rng, p["wall"], 10)
    pen.rect(0, 0, 1, floor_top, wall)
    pen.rect(0, floor_top - 0.18, 1, floor_top, scaled(wall, 0.7))
    for _ in range(rng.integers(1, 3)):
        x, y = rng.uniform(0.25, 0.75), rng.uniform(0.12, 0.25)
        pen.rect(x - 0.09, y - 0.07, x + 0.09, y + 0.07, p["frame"])
        pen.rect(x - 0.07, y - 0.05, x + 0.07, y + 0.05, shade(rng, (90, 120, 80), 20))
    for _ in range(rng.integers(2, 4)):
        x = rng.uniform(0.05, 0.95)
        pen.line([(x, 0), (x, 0.1)], (40, 30, 20), 0.01)
        pen.ellipse(x, 0.12, 0.045, 0.03, p["lamp"])
    floor = shade(rng, p["floor"], 8)
    pen.rect(0, floor_top, 1, 1, floor)
    for y in np.arange(floor_top + 0.06, 1, 0.07):
        pen.rect(0, y, 1, y + 0.008, scaled(floor, 0.75))
    cloth = shade(rng, p["cloth"], 4)
    for x in (rng.uniform(0.0, 0.1), rng.uniform(0.9, 1.0)):
        top = rng.uniform(0.5, 0.56)
        pen.rect(x - 0.16, top, x + 0.16, top + 0.04, cloth)
        pen.poly([(x - 0.16, top + 0.04), (x + 0.16, top + 0.04), (x + 0.2, top + 0.26),
                  (x - 0.2, top + 0.26)], cloth)
        pen.ellipse(x, top - 0.02, 0.025, 0.04, (200, 40, 60))


def draw_snow(pen: Pen, rng, p) -> None:
    """A pale grey sky, white ground with drifts, falling snowflakes, snowy pines far away."""
    horizon = rng.uniform(0.48, 0.58)
    _sky(pen, rng, p["sky"], horizon)
    snow = shade(rng, p["snow"], 3)
    for _ in range(rng.integers(0, 4)):
        x, h = rng.uniform(0, 1), rng.uniform(0.08, 0.14)
        pen.poly([(x - h * 0.4, horizon), (x, horizon - h), (x + h * 0.4, horizon)], (70, 95, 85))
        cap = horizon - h * 0.6
        pen.poly([(x - h * 0.15, cap), (x, horizon - h), (x + h * 0.15, cap)], snow)
    pen.rect(0, horizon, 1, 1, snow)
    for _ in range(rng.integers(3, 6)):
        pen.ellipse(rng.uniform(0, 1), rng.uniform(horizon + 0.05, 1), rng.uniform(0.1, 0.2), 0.02,
                    (222, 228, 238))
    for _ in range(rng.integers(25, 45)):
        x, y, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.006, 0.012)
        pen.ellipse(x, y, r, r, (255, 255, 255))


def draw_moon(pen: Pen, rng, p) -> None:
    """Black sky with a few stars and the earth, grey cratered ground with a curved horizon."""
    horizon = rng.uniform(0.55, 0.63)
    pen.rect(0, 0, 1, 1, shade(rng, p["space"], 4))
    for _ in range(rng.integers(5, 12)):
        x, y = rng.uniform(0, 1), rng.uniform(0, horizon)
        pen.ellipse(x, y, 0.004, 0.004, (200, 200, 200))
    ex = rng.choice([rng.uniform(0.1, 0.25), rng.uniform(0.75, 0.9)])
    ey, er = rng.uniform(0.12, 0.22), rng.uniform(0.07, 0.09)
    pen.ellipse(ex, ey, er, er, shade(rng, p["earth"], 8))
    pen.ellipse(ex - er * 0.3, ey - er * 0.2, er * 0.4, er * 0.3, (60, 150, 70))
    pen.ellipse(ex + er * 0.3, ey + er * 0.3, er * 0.3, er * 0.2, (240, 240, 240))
    ground = shade(rng, p["ground"], 10)
    pen.ellipse(0.5, horizon + 1.5, 1.6, 1.5, ground)
    for _ in range(rng.integers(5, 9)):
        x, y, r = rng.uniform(0, 1), rng.uniform(horizon + 0.06, 1), rng.uniform(0.03, 0.07)
        pen.ellipse(x, y - r * 0.08, r, r * 0.4, scaled(ground, 1.2))
        pen.ellipse(x, y, r * 0.9, r * 0.32, scaled(ground, 0.7))


def draw_desert(pen: Pen, rng, p) -> None:
    """An orange sky with a pale sun, yellow dunes, sometimes a cactus."""
    horizon = rng.uniform(0.48, 0.56)
    sky = shade(rng, p["sky"], 8)
    vertical_gradient(pen, 0, horizon, sky, mix(sky, (252, 215, 140), 0.6))
    pen.ellipse(rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.25), 0.06, 0.06, (255, 245, 190))
    dune = shade(rng, p["dune"], 8)
    pen.rect(0, horizon, 1, 1, dune)
    for _ in range(rng.integers(2, 4)):
        x, w = rng.uniform(0, 1), rng.uniform(0.3, 0.5)
        pen.ellipse(x, horizon + 0.05, w, 0.08, scaled(dune, rng.choice([0.9, 1.06])))
    for _ in range(rng.integers(2, 4)):
        x, w = rng.uniform(0, 1), rng.uniform(0.3, 0.6)
        pen.ellipse(x, rng.uniform(horizon + 0.2, 0.95), w, 0.05, scaled(dune, 0.88))
    for _ in range(rng.integers(0, 2)):
        x = rng.choice([rng.uniform(0.05, 0.18), rng.uniform(0.82, 0.95)])
        base, h = horizon + rng.uniform(0.08, 0.18), rng.uniform(0.12, 0.18)
        pen.line([(x, base), (x, base - h)], (60, 130, 60), 0.035)
        arm = [(x, base - h * 0.4), (x - 0.04, base - h * 0.4), (x - 0.04, base - h * 0.7)]
        pen.line(arm, (60, 130, 60), 0.02)


BOOKS = ((140, 30, 35), (30, 50, 110), (30, 100, 55), (200, 160, 50), (110, 70, 40), (100, 30, 80),
          (220, 220, 200), (40, 120, 140))


def draw_library(pen: Pen, rng, p) -> None:
    """Shelves of coloured book spines from top to bottom."""
    shelf = shade(rng, p["shelf"], 8)
    pen.rect(0, 0, 1, 1, scaled(shelf, 0.6))
    height = rng.uniform(0.19, 0.23)
    y = -rng.uniform(0, height)
    while y < 1:
        x = 0.0
        while x < 1:
            w = rng.uniform(0.025, 0.05)
            top = y + height * rng.uniform(0.1, 0.3)
            book = shade(rng, BOOKS[rng.integers(len(BOOKS))], 15)
            pen.rect(x, top, x + w, y + height - 0.03, book)
            if rng.random() < 0.4:
                pen.rect(x, top + 0.03, x + w, top + 0.04, (225, 190, 80))
            x += w + 0.004
        pen.rect(0, y + height - 0.03, 1, y + height, shelf)
        y += height
    pen.rect(0, 0, 0.03, 1, shelf)
    pen.rect(0.97, 0, 1, 1, shelf)


def draw_night_sky(pen: Pen, rng, p) -> None:
    """A dark blue sky with stars and a moon over dark hills."""
    horizon = rng.uniform(0.66, 0.76)
    sky = shade(rng, p["sky"], 6)
    vertical_gradient(pen, 0, horizon + 0.1, scaled(sky, 0.7), mix(sky, (50, 60, 120), 0.5))
    for _ in range(rng.integers(30, 55)):
        x, y, r = rng.uniform(0, 1), rng.uniform(0, horizon), rng.choice([0.005, 0.008, 0.011])
        pen.ellipse(x, y, r, r, (255, 255, rng.integers(200, 256)))
    mx = rng.choice([rng.uniform(0.08, 0.22), rng.uniform(0.78, 0.92)])
    my, mr = rng.uniform(0.1, 0.22), rng.uniform(0.06, 0.08)
    pen.ellipse(mx, my, mr, mr, shade(rng, p["moon"], 5))
    if rng.random() < 0.5:  # a crescent
        pen.ellipse(mx + mr * 0.45, my - mr * 0.2, mr * 0.85, mr * 0.85, scaled(sky, 0.8))
    hills = shade(rng, p["hills"], 4)
    for _ in range(3):
        pen.ellipse(rng.uniform(0, 1), horizon + 0.08, rng.uniform(0.3, 0.5), 0.12, hills)
    pen.rect(0, horizon + 0.06, 1, 1, hills)


def draw_castle(pen: Pen, rng, p) -> None:
    """Blue sky, a grey castle wall with a gate and towers at both sides, green grass."""
    ground = rng.uniform(0.68, 0.74)
    _sky(pen, rng, p["sky"], ground)
    _clouds(pen, rng, 0.3, rng.integers(0, 2))
    stone = shade(rng, p["stone"], 10)
    wall, wall_top = scaled(stone, 1.08), rng.uniform(0.3, 0.38)
    pen.rect(0, wall_top, 1, ground, wall)
    for i in range(12):
        pen.rect(i / 12, wall_top - 0.04, i / 12 + 1 / 24, wall_top, wall)
    roof = (170, 50, 45) if rng.random() < 0.5 else (50, 70, 150)
    for x0, x1 in ((0, rng.uniform(0.18, 0.24)), (rng.uniform(0.76, 0.82), 1)):
        top = rng.uniform(0.1, 0.16)
        pen.rect(x0, top, x1, ground, stone)
        for k in range(3):
            pen.rect(x0 + (x1 - x0) * k / 3, top - 0.04, x0 + (x1 - x0) * (k + 0.5) / 3, top, stone)
        if rng.random() < 0.5:
            pen.poly([(x0 - 0.02, top - 0.04), ((x0 + x1) / 2, top - 0.16), (x1 + 0.02, top - 0.04)], roof)
        pen.rect((x0 + x1) / 2 - 0.015, top + 0.08, (x0 + x1) / 2 + 0.015, top + 0.16, (40, 40, 45))
    for y in np.arange(wall_top + 0.06, ground, 0.07):
        pen.rect(0, y, 1, y + 0.006, scaled(stone, 0.8))
    pen.ellipse(0.5, ground - 0.14, 0.09, 0.08, p["gate"])
    pen.rect(0.41, ground - 0.14, 0.59, ground, p["gate"])
    pen.rect(0, ground, 1, 1, shade(rng, p["grass"], 10))


def draw_bridge(pen: Pen, rng, p) -> None:
    """Blue sky, a brown stone bridge with a railing, an arch over blue water."""
    deck = rng.uniform(0.28, 0.36)
    water_top = rng.uniform(0.78, 0.84)
    _sky(pen, rng, p["sky"], deck)
    stone = shade(rng, p["stone"], 10)
    pen.rect(0, deck, 1, water_top, stone)
    for i in range(16):
        pen.rect(i / 16, deck - 0.07, i / 16 + 0.02, deck, stone)
    pen.rect(0, deck - 0.075, 1, deck - 0.06, stone)
    pen.rect(0, deck, 1, deck + 0.015, scaled(stone, 0.7))
    water = shade(rng, p["water"], 8)
    span = rng.uniform(0.3, 0.36)
    pen.ellipse(0.5, water_top, span, water_top - deck - 0.1, shade(rng, p["arch_water"], 6))
    pen.rect(0, water_top, 1, 1, water)
    for y in np.arange(deck + 0.06, water_top, 0.06):
        pen.rect(0, y, 0.5 - span - 0.02, y + 0.006, scaled(stone, 0.82))
        pen.rect(0.5 + span + 0.02, y, 1, y + 0.006, scaled(stone, 0.82))
    for _ in range(rng.integers(6, 12)):
        x, y = rng.uniform(0, 1), rng.uniform(water_top + 0.03, 1)
        pen.line([(x, y), (x + 0.08, y)], scaled(water, 1.4), 0.01)


def draw_waterfall(pen: Pen, rng, p) -> None:
    """A white-blue falling stream between dark mossy rocks, a foaming pool below."""
    pool_top = rng.uniform(0.8, 0.86)
    fall = shade(rng, p["fall"], 6)
    pen.rect(0, 0, 1, pool_top, fall)
    for _ in range(rng.integers(10, 16)):
        x = rng.uniform(0.2, 0.8)
        pen.line([(x, 0), (x, pool_top)], p["streak"], 0.01)
    rock = shade(rng, p["rock"], 10)
    left, right = rng.uniform(0.22, 0.28), rng.uniform(0.72, 0.78)
    jag = rng.uniform(-0.03, 0.03, 8)
    heights = [i / 7 * pool_top for i in range(8)]
    pen.poly([(0, 0)] + [(left + jag[i], y) for i, y in enumerate(heights)] + [(0, pool_top)], rock)
    pen.poly([(1, 0)] + [(right - jag[i], y) for i, y in enumerate(heights)] + [(1, pool_top)], rock)
    for _ in range(rng.integers(4, 8)):
        x = rng.choice([rng.uniform(0, left - 0.05), rng.uniform(right + 0.05, 1)])
        pen.ellipse(x, rng.uniform(0.05, pool_top), 0.05, 0.025, shade(rng, p["moss"], 10))
        pen.ellipse(rng.choice([rng.uniform(0, left - 0.04), rng.uniform(right + 0.04, 1)]),
                    rng.uniform(0.05, pool_top), 0.04, 0.03, scaled(rock, 0.7))
    pool = shade(rng, p["pool"], 8)
    pen.rect(0, pool_top, 1, 1, pool)
    for _ in range(rng.integers(5, 9)):
        pen.ellipse(rng.uniform(0.2, 0.8), pool_top + rng.uniform(0, 0.05), 0.06, 0.02, p["foam"])


def draw_cave(pen: Pen, rng, p) -> None:
    """Dark brown rock with stalactites around a bright opening."""
    rock = shade(rng, p["rock"], 8)
    pen.rect(0, 0, 1, 1, rock)
    cx, cy = 0.5 + rng.uniform(-0.03, 0.03), rng.uniform(0.38, 0.42)
    rx, ry = rng.uniform(0.24, 0.3), rng.uniform(0.26, 0.3)
    light = shade(rng, p["light"], 8)
    pen.ellipse(cx, cy, rx, ry, light)
    pen.ellipse(cx, cy + ry * 0.7, rx * 0.9, ry * 0.35, p["outside"])
    for _ in range(rng.integers(6, 10)):
        x, h = rng.uniform(0.05, 0.95), rng.uniform(0.06, 0.16)
        pen.poly([(x - 0.03, 0), (x + 0.03, 0), (x, h)], scaled(rock, 0.8))
    for _ in range(rng.integers(6, 10)):
        pen.ellipse(rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.06), rng.uniform(0.02, 0.04),
                    scaled(rock, rng.choice([0.7, 1.25])))
    floor = shade(rng, p["floor"], 8)
    pen.rect(0, rng.uniform(0.8, 0.86), 1, 1, floor)


SPOTLIGHTS = ((255, 60, 60), (60, 120, 255), (60, 255, 120), (255, 220, 60), (255, 150, 40), (255, 255, 255))


def draw_concert(pen: Pen, rng, p) -> None:
    """A dark hall with coloured spotlight beams over a black crowd."""
    pen.rect(0, 0, 1, 1, shade(rng, p["dark"], 6))
    beams = Image.new("RGBA", pen.image.size, (0, 0, 0, 0))
    beam_pen = Pen(beams)
    count = int(rng.integers(5, 7))
    for i in range(count):  # spread over the stage, so every part of the picture sees some light
        x, colour = (i + rng.uniform(0.2, 0.8)) / count, SPOTLIGHTS[rng.integers(len(SPOTLIGHTS))]
        spread, aim = rng.uniform(0.08, 0.14), rng.uniform(-0.15, 0.15)
        beam_pen.poly([(x - 0.01, 0), (x + 0.01, 0), (x + aim + spread, 0.8), (x + aim - spread, 0.8)],
                      colour + (90,))
        beam_pen.ellipse(x, 0.03, 0.03, 0.025, colour + (255,))
    overlay(pen, beams)
    pen.rect(0, 0, 1, 0.03, (70, 70, 75))
    crowd = shade(rng, p["crowd"], 3)
    base = rng.uniform(0.74, 0.78)
    pen.rect(0, base + 0.1, 1, 1, crowd)
    x = -rng.uniform(0, 0.05)
    while x < 1.05:
        r, y = rng.uniform(0.045, 0.06), base + rng.uniform(-0.02, 0.02)
        pen.ellipse(x, y, r, r * 1.1, crowd)
        pen.ellipse(x, y + r * 2.6, r * 1.8, r * 1.6, crowd)
        if rng.random() < 0.3:
            pen.line([(x + r, y + r), (x + r * 1.8, y - 0.13)], crowd, 0.025)
        x += rng.uniform(0.09, 0.13)


def draw_balcony(pen: Pen, rng, p) -> None:
    """Sky beyond a white railing of balusters, terracotta floor tiles."""
    floor_top = rng.uniform(0.8, 0.86)
    _sky(pen, rng, p["sky"], floor_top)
    _clouds(pen, rng, 0.6, rng.integers(0, 3))
    if rng.random() < 0.6:
        x = 0.0
        while x < 1:
            w, h = rng.uniform(0.06, 0.12), rng.uniform(0.08, 0.2)
            pen.rect(x, 0.55 - h, x + w, 0.56, (170, 185, 205))
            x += w
    rail = shade(rng, p["rail"], 4)
    top = rng.uniform(0.46, 0.52)
    pen.rect(0, top, 1, top + 0.045, rail)
    pen.rect(0, floor_top - 0.05, 1, floor_top, rail)
    gap, x = rng.uniform(0.07, 0.09), rng.uniform(0, 0.03)
    while x < 1:
        pen.rect(x, top, x + 0.025, floor_top, rail)
        pen.ellipse(x + 0.0125, (top + floor_top) / 2, 0.018, 0.04, rail)
        x += gap
    floor = shade(rng, p["floor"], 8)
    _board_floor(pen, floor_top, floor, boards=9, spacing=0.1, darkness=0.8, width=0.006)


def _board_floor(pen: Pen, top: float, colour, *, boards: int, spacing: float, darkness: float,
                 width: float) -> None:
    """Paints a floor from `top` down, its board seams widening towards the viewer."""
    pen.rect(0, top, 1, 1, colour)
    middle = boards // 2
    for i in range(boards):
        pen.line([(0.5 + (i - middle) * spacing, top), (0.5 + (i - middle) * 2 * spacing, 1)],
                 scaled(colour, darkness), width)


def draw_table(pen: Pen, rng, p) -> None:
    """A cream wall behind a brown wooden table top."""
    edge = rng.uniform(0.56, 0.64)
    wall = shade(rng, p["wall"], 8)
    pen.rect(0, 0, 1, edge, wall)
    if rng.random() < 0.5:
        for x in np.arange(rng.uniform(0, 0.1), 1, 0.1):
            pen.rect(x, 0, x + 0.02, edge, scaled(wall, 0.95))
    wood = shade(rng, p["wood"], 10)
    pen.rect(0, edge, 1, 1, wood)
    pen.rect(0, edge, 1, edge + 0.015, scaled(wood, 1.2))
    for _ in range(rng.integers(5, 9)):
        y = rng.uniform(edge + 0.04, 1)
        pen.line([(0, y), (0.5, y + rng.uniform(-0.015, 0.015)), (1, y + rng.uniform(-0.02, 0.02))],
                 scaled(wood, 0.8), 0.008)


def draw_underwater(pen: Pen, rng, p) -> None:
    """Teal water darkening with depth, light rays, bubbles, seaweed, a sandy floor."""
    bottom = rng.uniform(0.84, 0.9)
    vertical_gradient(pen, 0, bottom, shade(rng, p["shallow"], 8), shade(rng, p["deep"], 6))
    rays = Image.new("RGBA", pen.image.size, (0, 0, 0, 0))
    ray_pen = Pen(rays)
    for _ in range(rng.integers(2, 5)):
        x = rng.uniform(0, 1)
        ray_pen.poly([(x, 0), (x + 0.06, 0), (x - 0.1, 0.8), (x - 0.2, 0.8)], (200, 240, 240, 40))
    overlay(pen, rays)
    pen.rect(0, bottom, 1, 1, shade(rng, p["sand"], 8))
    weed = shade(rng, p["weed"], 10)
    for _ in range(rng.integers(3, 6)):
        x, h = rng.choice([rng.uniform(0, 0.2), rng.uniform(0.8, 1)]), rng.uniform(0.25, 0.45)
        pen.line([(x + 0.02 * math.sin(k * 1.3), bottom - h * k / 6) for k in range(7)], weed, 0.02)
    for _ in range(rng.integers(6, 12)):
        x, y, r = rng.uniform(0, 1), rng.uniform(0, bottom), rng.uniform(0.01, 0.02)
        pen.draw.ellipse([(x - r) * pen.size, (y - r) * pen.size, (x + r) * pen.size, (y + r) * pen.size],
                         outline=p["bubble"], width=max(1, pen.size // 128))


def draw_volcano(pen: Pen, rng, p) -> None:
    """A smoky red sky, a cone with glowing lava flows, black rock with lava cracks."""
    ground = rng.uniform(0.66, 0.72)
    vertical_gradient(pen, 0, ground, shade(rng, p["smoke"], 6), shade(rng, p["glow"], 8))
    rock, lava = shade(rng, p["rock"], 5), shade(rng, p["lava"], 5)
    peak, width, top = rng.uniform(0.4, 0.6), rng.uniform(0.45, 0.6), rng.uniform(0.15, 0.25)
    for _ in range(rng.integers(3, 6)):
        pen.ellipse(peak + rng.uniform(-0.15, 0.15), rng.uniform(0.02, top - 0.04), 0.1, 0.05, (75, 62, 60))
    pen.poly([(peak - width, ground), (peak - 0.08, top), (peak + 0.08, top), (peak + width, ground)],
             mix(rock, (120, 80, 60), 0.5))
    pen.ellipse(peak, top, 0.1, 0.04, (255, 210, 90))
    for side in (-1, 1):
        x, points = peak + side * 0.04, []
        for k in range(7):
            points.append((x, top + (ground - top) * k / 6))
            x += side * rng.uniform(0.0, 0.07)
        pen.line(points, lava, 0.03)
    pen.rect(0, ground, 1, 1, rock)
    for _ in range(rng.integers(4, 8)):
        x, y = rng.uniform(0, 1), rng.uniform(ground + 0.03, 1)
        pen.line([(x, y), (x + 0.06, y + 0.02), (x + 0.12, y - 0.01)], lava, 0.012)


def draw_boat(pen: Pen, rng, p) -> None:
    """Blue sky, a deep blue sea with white crests, a white rail, a wooden deck."""
    horizon, deck = rng.uniform(0.36, 0.44), rng.uniform(0.7, 0.76)
    _sky(pen, rng, p["sky"], horizon)
    _clouds(pen, rng, horizon, rng.integers(0, 3))
    sea = shade(rng, p["sea"], 8)
    pen.rect(0, horizon, 1, deck, sea)
    for _ in range(rng.integers(6, 12)):
        x, y = rng.uniform(0, 1), rng.uniform(horizon + 0.03, deck - 0.08)
        pen.line([(x, y), (x + 0.04, y - 0.015), (x + 0.08, y)], (230, 240, 250), 0.01)
    pen.rect(0, deck - 0.07, 1, deck - 0.045, (245, 245, 245))
    for x in np.arange(rng.uniform(0, 0.1), 1, 0.12):
        pen.rect(x, deck - 0.07, x + 0.015, deck, (245, 245, 245))
    wood = shade(rng, p["deck"], 8)
    _board_floor(pen, deck, wood, boards=12, spacing=0.08, darkness=0.75, width=0.008)


def draw_autumn(pen: Pen, rng, p) -> None:
    """Orange and red crowns on dark trunks, a floor of fallen leaves."""
    ground_top = rng.uniform(0.66, 0.74)
    leaves = shade(rng, p["leaves"], 8)
    pen.rect(0, 0, 1, ground_top, (190, 200, 210))
    for _ in range(rng.integers(6, 9)):
        x, w = rng.uniform(0, 1), rng.uniform(0.03, 0.06)
        pen.rect(x - w / 2, 0, x + w / 2, ground_top + 0.02, shade(rng, p["trunk"], 10))
    pen.rect(0, 0, 1, 0.2, leaves)
    for _ in range(rng.integers(14, 20)):
        x, y = rng.uniform(0, 1), rng.uniform(0.05, 0.4)
        pen.ellipse(x, y, rng.uniform(0.07, 0.12), rng.uniform(0.05, 0.09),
                    shade(rng, mix(leaves, (230, 180, 40) if rng.random() < 0.5 else (190, 50, 30), 0.4), 10))
    ground = shade(rng, p["ground"], 8)
    pen.rect(0, ground_top, 1, 1, ground)
    for _ in range(rng.integers(15, 25)):
        pen.ellipse(rng.uniform(0, 1), rng.uniform(ground_top, 1), 0.015, 0.008,
                    (230, 170, 40) if rng.random() < 0.5 else (200, 50, 30))


CONTEXT_PAINTERS: dict[str, Callable] = {
    "in park": draw_park, "near a pool": draw_pool, "on street": draw_street,
    "in a forest": draw_forest, "in a kitchen": draw_kitchen, "on the beach": draw_beach,
    "in a restaurant": draw_restaurant, "on snowy ground": draw_snow, "on the moon": draw_moon,
    "in desert": draw_desert, "in library": draw_library, "under the night sky": draw_night_sky,
    "in front of the castle": draw_castle, "on the bridge": draw_bridge,
    "next to waterfall": draw_waterfall, "in the cave": draw_cave,
    "at a concert venue": draw_concert, "on a balcony": draw_balcony, "on a table": draw_table,
    "underwater": draw_underwater, "next to a volcano": draw_volcano, "on a boat": draw_boat,
    "in an autumn forest": draw_autumn,
}
