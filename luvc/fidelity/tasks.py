"""The fidelity task suite: short-answer questions about rendered overlays on real photographs.

Five tasks stress what real VLM benchmarks stress, each answered by one word
scored by exact match:

* ``text``: read the handwritten digit on a small label somewhere in the image
  (DocVQA / TextVQA-like: a small region decides the answer);
* ``chart``: read one bar's value off a bar chart with grid lines (ChartQA-like);
* ``count``: count the shapes (one kind and size per image) scattered over the photo;
* ``color``: name the colour of the shape in a given panel of a four-panel figure;
* ``spatial``: say where one shape is relative to another.

Photographs come from scikit-image's bundled images, digits from
scikit-learn's bundled digits. Splits never share a photograph or a digit
glyph; chart value tuples are assigned to splits by hash; every other overlay
is drawn from a continuous layout, so items of different splits never
coincide. Generation is a pure function of ``(split, index)``.

Each item also has a region map naming what every pixel shows in the words
of the question it answers (``REGIONS``), which training uses to supervise
every visual token, not only the answer.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from functools import cache

import numpy as np

SIZE = 224  # pixels per side: 32 x 32 patches of 7 px -> 256 LLM tokens after the 2 x 2 merger
TASKS = ("text", "chart", "count", "color", "spatial")
SPLITS = ("train", "val", "test")

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 225, 30),
    "purple": (150, 50, 200),
    "orange": (250, 135, 10),
}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
PANELS = {v: k for k, v in QUADRANTS.items()}
RELATIONS = ("left", "right", "above", "below")

# Photographs per split (scikit-image's bundled images; none is shared).
PHOTOS = {
    "train": ("astronaut", "camera", "cell", "clock", "coins", "colorwheel", "gravel", "hubble_deep_field",
              "immunohistochemistry", "moon", "page", "retina", "text", "cat"),
    "val": ("chelsea", "brick"),
    "test": ("coffee", "rocket", "grass"),
}
# scikit-learn's 1797 digit glyphs, by index range.
GLYPHS = {"test": range(0, 300), "val": range(300, 500), "train": range(500, 1797)}


@dataclass(frozen=True)
class Item:
    """One question about one image."""

    task: str
    image: np.ndarray  # [SIZE, SIZE, 3] uint8
    question: str
    answer: str
    key: str  # what makes the overlay unique; never shared across splits
    more: tuple[tuple[str, str], ...] = ()  # other (question, answer) pairs about the same image, for training
    regions: np.ndarray | None = None  # [SIZE, SIZE] index into REGIONS: what each pixel shows, for training


def vocabulary() -> list[str]:
    """Every word a question or answer can use, in a fixed order."""
    words = [str(i) for i in range(10)]
    words += list(COLORS) + list(SHAPES) + list(RELATIONS)
    for text in _question_templates():
        words += text.split()
    return list(dict.fromkeys(words))


def _question_templates() -> list[str]:
    return [
        "what digit is on the label ?",
        "what is the value of the bar ?",
        "how many shapes are there ?",
        "what colour is the shape in the top bottom left right ?",
        "where is the relative to the ?",
    ]


def _regions() -> tuple[str, ...]:
    names = ["background"]
    names += [f"digit {d}" for d in range(10)]
    names += [f"bar {c} {v}" for c in ("red", "green", "blue", "yellow") for v in range(1, 10)]
    names += [f"count {n}" for n in range(1, 7)]
    names += [f"{c} {s} {q}" for c in COLORS for s in SHAPES for q in QUADRANTS]
    names += [f"{c} {s} {r}" for c in COLORS for s in SHAPES for r in RELATIONS]
    return tuple(names)


# What a pixel shows, in the words of the question it answers: a region map per item lets
# training supervise every visual token (``luvc.fidelity.train``), not only the answer.
REGIONS = _regions()
_REGION = {name: i for i, name in enumerate(REGIONS)}

PHOTO = 0.45  # weight of the photograph in a background (the rest is flat grey)


def make_item(split: str, index: int, task: str | None = None, photo: float = PHOTO) -> Item:
    """The ``index``-th item of ``split``; tasks cycle unless ``task`` is given.

    ``photo`` is the photograph's weight in the background; only training
    lowers it, as a curriculum (a flat background first, then the photo fades in).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    task = task or TASKS[index % len(TASKS)]
    seed = zlib.crc32(f"{split}/{task}/{index}".encode())
    rng = np.random.default_rng(seed)
    return _RENDERERS[task](split, rng, photo)


def items(split: str, count: int, tasks: tuple[str, ...] = TASKS, start: int = 0, photo: float = PHOTO) -> list[Item]:
    """``count`` items of ``split``, the tasks interleaved, numbered from ``start``."""
    return [make_item(split, start + i, tasks[i % len(tasks)], photo) for i in range(count)]


# --- backgrounds ---------------------------------------------------------------------------------

@cache
def _photo(name: str) -> np.ndarray:
    from skimage import data

    image = np.asarray(getattr(data, name)())
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3].astype(np.uint8)


def _background(split: str, rng: np.random.Generator, weight: float) -> np.ndarray:
    """A random crop of one of the split's photographs, resized to SIZE and blended with grey."""
    from PIL import Image

    photo = _photo(PHOTOS[split][rng.integers(len(PHOTOS[split]))])
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((SIZE, SIZE), Image.BILINEAR)
    image = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return (weight * image + (1 - weight) * 128).astype(np.uint8)


# --- drawing -------------------------------------------------------------------------------------

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE]


def _shape_mask(kind: str, cy: float, cx: float, r: float) -> np.ndarray:
    if kind == "circle":
        return (_YY - cy) ** 2 + (_XX - cx) ** 2 <= r * r
    if kind == "square":
        return (np.abs(_YY - cy) <= r * 0.85) & (np.abs(_XX - cx) <= r * 0.85)
    # upward triangle inscribed in the circle of radius r
    top, bottom = cy - r, cy + r * 0.6
    half = (_YY - top) / (bottom - top) * r * 1.1
    return (_YY >= top) & (_YY <= bottom) & (np.abs(_XX - cx) <= half)


def _draw(image: np.ndarray, regions: np.ndarray, region: str, kind: str, color: str,
          cy: float, cx: float, r: float) -> None:
    mask = _shape_mask(kind, cy, cx, r)
    edge = _shape_mask(kind, cy, cx, r + 2) & ~mask
    image[edge] = 0
    image[mask] = COLORS[color]
    regions[mask | edge] = _REGION[region]


def _blank() -> np.ndarray:
    return np.zeros((SIZE, SIZE), dtype=np.uint8)


def _place(rng: np.random.Generator, n: int, r: float, box=(0, 0, SIZE, SIZE), gap: float = 6.0):
    """``n`` centres inside ``box`` (y0, x0, y1, x1) at least ``2r + gap`` apart."""
    y0, x0, y1, x1 = box
    for _ in range(200):
        pts = np.stack([rng.uniform(y0 + r + 3, y1 - r - 3, n), rng.uniform(x0 + r + 3, x1 - r - 3, n)], 1)
        d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(n) * 1e9
        if d.min() >= 2 * r + gap:
            return pts
    raise RuntimeError("could not place shapes")  # unreachable for the sizes used here


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target


# --- tasks ---------------------------------------------------------------------------------------

def _text(split: str, rng: np.random.Generator, photo: float) -> Item:
    image = _background(split, rng, photo)
    glyphs, labels = _digits()
    g = int(rng.choice(GLYPHS[split]))
    scale = int(rng.integers(5, 7))  # 40 or 48 px tall: about 3 x 3 patches
    glyph = np.kron(glyphs[g], np.ones((scale, scale), dtype=np.float32))
    pad = 4
    side = glyph.shape[0] + 2 * pad
    y, x = rng.integers(0, SIZE - side + 1, 2)
    label = np.full((side, side, 3), 245, dtype=np.float32)
    label[pad:pad + glyph.shape[0], pad:pad + glyph.shape[1]] *= (1 - glyph[..., None] * 0.9)
    image[y:y + side, x:x + side] = label.astype(np.uint8)
    regions = _blank()
    regions[y:y + side, x:x + side] = _REGION[f"digit {int(labels[g])}"]
    return Item("text", image, "what digit is on the label ?", str(int(labels[g])), f"glyph{g}", regions=regions)


def _chart(split: str, rng: np.random.Generator, photo: float) -> Item:
    while True:
        values = tuple(int(v) for v in rng.integers(1, 10, 4))
        if _split_of_key(str(values)) == split:
            break
    colors = [str(c) for c in rng.permutation(["red", "green", "blue", "yellow"])]
    image = np.full((SIZE, SIZE, 3), 250, dtype=np.uint8)
    base, unit = 206, 21
    for v in range(10):
        image[base - v * unit, 16:212] = (200, 200, 200) if v else (0, 0, 0)
    image[base - 9 * unit:base + 1, 16] = 0
    regions = _blank()
    for i, (value, color) in enumerate(zip(values, colors)):
        x0 = 28 + i * 46
        image[base - value * unit:base, x0:x0 + 30] = COLORS[color]
        regions[base - value * unit:base, x0:x0 + 30] = _REGION[f"bar {color} {value}"]
    asked = int(rng.integers(4))
    pairs = [(f"what is the value of the {c} bar ?", str(v)) for c, v in zip(colors, values)]
    question, answer = pairs.pop(asked)
    return Item("chart", image, question, answer, f"chart{values}{colors}", tuple(pairs), regions)


def _count(split: str, rng: np.random.Generator, photo: float) -> Item:
    image = _background(split, rng, photo)
    n = int(rng.integers(1, 7))
    r = 14.0
    color, kind = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
    pts = _place(rng, n, r)
    regions = _blank()
    for cy, cx in pts:
        _draw(image, regions, f"count {n}", kind, color, cy, cx, r)
    return Item("count", image, "how many shapes are there ?", str(n), f"count{pts.round(1).tolist()}",
                regions=regions)


def _color(split: str, rng: np.random.Generator, photo: float) -> Item:
    image = _background(split, rng, photo)
    colors = [str(c) for c in rng.choice(list(COLORS), 4, replace=False)]
    half = SIZE // 2
    image[half - 1:half + 1] = 0  # a four-panel figure: the panels are what "top left" names
    image[:, half - 1:half + 1] = 0
    centres, regions = [], _blank()
    for (qy, qx), color in zip(QUADRANTS.values(), colors):
        r = float(rng.uniform(18, 26))
        (cy, cx), = _place(rng, 1, r, (qy * half + 2, qx * half + 2, (qy + 1) * half - 2, (qx + 1) * half - 2))
        kind = str(rng.choice(SHAPES))
        _draw(image, regions, f"{color} {kind} {PANELS[qy, qx]}", kind, color, cy, cx, r)
        centres.append((round(cy, 1), round(cx, 1)))
    name, answer = list(zip(QUADRANTS, colors))[int(rng.integers(4))]
    return Item("color", image, f"what colour is the shape in the {name} ?", answer, f"color{centres}",
                regions=regions)


def _spatial(split: str, rng: np.random.Generator, photo: float) -> Item:
    image = _background(split, rng, photo)
    a, b = (str(s) for s in rng.choice(SHAPES, 2, replace=False))
    ca, cb = (str(c) for c in rng.choice(list(COLORS), 2, replace=False))
    relation = str(rng.choice(RELATIONS))
    r = float(rng.uniform(16, 22))
    while True:
        pa = rng.uniform(r + 4, SIZE - r - 4, 2)
        pb = rng.uniform(r + 4, SIZE - r - 4, 2)
        dy, dx = pa - pb
        along, across = (dx, dy) if relation in ("left", "right") else (dy, dx)
        sign = -1 if relation in ("left", "above") else 1
        if sign * along >= 2 * r + 20 and abs(across) <= 0.5 * abs(along):
            break
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}[relation]
    regions = _blank()
    _draw(image, regions, f"{ca} {a} {relation}", a, ca, *pa, r)
    _draw(image, regions, f"{cb} {b} {opposite}", b, cb, *pb, r)
    return Item("spatial", image, f"where is the {a} relative to the {b} ?", relation,
                f"spatial{pa.round(1).tolist()}{pb.round(1).tolist()}",
                ((f"where is the {b} relative to the {a} ?", opposite),), regions)


_RENDERERS = {"text": _text, "chart": _chart, "count": _count, "color": _color, "spatial": _spatial}


def _split_of_key(key: str) -> str:
    """A fixed split for a discrete overlay: 10% test, 10% validation, 80% train."""
    bucket = hashlib.sha256(key.encode()).digest()[0] % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"
