"""The built-in `shapes` dataset: labelled coloured shapes on varied backgrounds, drawn on the fly.

Deterministic per (seed, index), so the demo and the tests get the same real images on every
machine without a download. Shapes are drawn at 4x and downsampled for anti-aliased edges.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "ring", "cross")
_SUPERSAMPLE = 4


def _random_color(rng: np.random.Generator, bright: bool) -> tuple[int, int, int]:
    hue = rng.random()
    sat = rng.uniform(0.5, 1.0) if bright else rng.uniform(0.0, 0.4)
    val = rng.uniform(0.75, 1.0) if bright else rng.uniform(0.15, 0.6)
    i = int(hue * 6) % 6
    f = hue * 6 - int(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    rgb = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i]
    return tuple(int(255 * c) for c in rgb)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    first, second = _random_color(rng, bright=False), _random_color(rng, bright=False)
    kind = rng.integers(4)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    if kind == 0:
        weight = np.zeros((size, size))
    elif kind == 1:
        angle = rng.uniform(0, 2 * math.pi)
        weight = np.clip(0.5 + (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle), 0, 1)
    elif kind == 2:
        period = rng.integers(3, 7) / size * _SUPERSAMPLE
        weight = (np.floor(x / period) % 2).astype(float)
    else:
        cell = rng.integers(4, 9) / size * _SUPERSAMPLE
        weight = ((np.floor(x / cell) + np.floor(y / cell)) % 2).astype(float)
    pixels = (1 - weight[..., None]) * np.array(first) + weight[..., None] * np.array(second)
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


def _polygon(cx: float, cy: float, radius: float, corners: int, rotation: float,
             inner_ratio: float | None = None) -> list[tuple[float, float]]:
    points = []
    steps = corners * 2 if inner_ratio else corners
    for k in range(steps):
        r = radius * (inner_ratio if inner_ratio and k % 2 else 1.0)
        angle = rotation + 2 * math.pi * k / steps
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def shape_label(seed: int, index: int) -> int:
    """The class of image `index` without drawing it (the first draw of its generator)."""
    return int(np.random.default_rng([seed, index]).integers(len(SHAPE_CLASSES)))


def draw_shape(seed: int, index: int, size: int) -> tuple[np.ndarray, int]:
    """One image (uint8 (size, size, 3)) and its class id, a pure function of (seed, index, size)."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(SHAPE_CLASSES)))
    canvas_size = size * _SUPERSAMPLE
    canvas = _background(rng, canvas_size)
    draw = ImageDraw.Draw(canvas)
    color = _random_color(rng, bright=True)
    radius = rng.uniform(0.2, 0.38) * canvas_size
    cx = rng.uniform(radius, canvas_size - radius)
    cy = rng.uniform(radius, canvas_size - radius)
    rotation = rng.uniform(0, 2 * math.pi)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    name = SHAPE_CLASSES[label]
    if name == "circle":
        draw.ellipse(box, fill=color)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, radius, 4, rotation), fill=color)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, radius, 3, rotation), fill=color)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, radius, 5, rotation, inner_ratio=0.45), fill=color)
    elif name == "ring":
        draw.ellipse(box, outline=color, width=max(1, int(radius * 0.35)))
    else:
        arm = radius * 0.3
        for angle in (rotation, rotation + math.pi / 2):
            dx, dy = math.cos(angle), math.sin(angle)
            px, py = -dy * arm, dx * arm
            draw.polygon([(cx - dx * radius + px, cy - dy * radius + py), (cx + dx * radius + px, cy + dy * radius + py),
                          (cx + dx * radius - px, cy + dy * radius - py), (cx - dx * radius - px, cy - dy * radius - py)],
                         fill=color)
    image = canvas.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8), label
