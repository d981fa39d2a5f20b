"""The fidelity task suite: short-answer questions about rendered overlays on real photographs.

Five tasks stress what real VLM benchmarks stress, each answered by one word
scored by exact match:

* ``text``: read the printed digit on a small label somewhere in the image
  (DocVQA / TextVQA-like: one visual token in 256 decides the answer);
* ``chart``: read one bar's value off a bar chart with data labels (ChartQA-like);
* ``count``: count the shapes (one kind and colour per image) scattered over the photo;
* ``color``: name the colour of the circle, square or triangle among three shapes;
* ``spatial``: say where one shape is relative to another.

Photographs come from scikit-image's bundled images, glyphs from Pillow's
bundled font. Splits never share a photograph, and every overlay (a digit
label's glyph, size and cell; a chart's values; the shapes' patch
cells, kinds and colours) is assigned to one split by a hash of what it shows,
so items of different splits never coincide. Generation is a pure function of
``(split, index)``.

What answers a question is drawn dark on neutral grey (``LABEL``, about the
CLIP normalisation mean, so the label itself embeds near zero and the ink
is most of its token) or in saturated colour: a small deviation from a large
common component would be a small angle after the per-token normalisations of
the merger and the language model.

What names the answer sits in the same visual token as the answer wherever
the task allows: a bar's colour reaches into its data label's patch, and a
shape fills a patch-aligned 2 x 2 box so each of its patches shows part of
its outline (its kind) and its colour. Counting and spatial relations stay
relations between tokens, as in real benchmarks.

Training items also carry the other questions their image answers (``Item.more``):
a spatial item the colours of its two shapes, a colour item the relations between its
shapes that clearly hold, so every image teaches more than one answer.

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

SIZE = 224  # pixels per side: 16 x 16 patches of 14 px -> 256 LLM tokens
CELL = 14  # one patch: labels and bars are aligned to the patch grid
CELLS = SIZE // CELL
LABEL, INK = 118, 0  # grey levels of labels and chart backgrounds, and of printed text
MAX_COUNT = 4
BAR_IN_LABEL = 3  # rows of a bar's colour at the bottom of its data label's cell
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
RELATIONS = ("left", "right", "above", "below")
BAR_COLORS = ("red", "green", "blue", "yellow")

# Photographs per split (scikit-image's bundled images; none is shared: ``data.cat`` is ``data.chelsea``).
PHOTOS = {
    "train": ("astronaut", "camera", "cell", "clock", "coins", "colorwheel", "gravel", "hubble_deep_field",
              "immunohistochemistry", "moon", "page", "retina", "text"),
    "val": ("chelsea", "brick"),
    "test": ("coffee", "rocket", "grass"),
}


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


def task_of_question(question: str) -> str:
    """The task whose template ``question`` follows (a colour item's relation questions are ``spatial``)."""
    opening = question.split()[:2]
    for task, template in zip(TASKS, _question_templates()):
        if template.split()[:2] == opening:
            return task
    raise ValueError(f"{question!r} follows none of the task templates")


def _question_templates() -> list[str]:
    """One per task, in ``TASKS`` order."""
    return [
        "what digit is on the label ?",
        "what is the value of the bar ?",
        "how many shapes are there ?",
        "what colour is the ?",
        "where is the relative to the ?",
    ]


def _regions() -> tuple[str, ...]:
    names = ["background"]
    names += [f"digit {d}" for d in range(10)]
    names += [f"bar {c} {v}" for c in BAR_COLORS for v in range(1, 10)]
    names += [f"count {n}" for n in range(1, MAX_COUNT + 1)]
    names += [f"{c} {s}" for c in COLORS for s in SHAPES]
    names += [f"{c} {s} {r}" for c in COLORS for s in SHAPES for r in RELATIONS]
    return tuple(names)


# What a pixel shows, in the words of the question it answers: a region map per item lets
# training supervise every visual token (``luvc.fidelity.train``), not only the answer.
REGIONS = _regions()
_REGION = {name: i for i, name in enumerate(REGIONS)}

# What kind of answer a region carries; "relation" is a shape labelled with where it
# lies relative to the other shape ("red circle left").
REGION_GROUPS = ("background", "digit", "bar", "count", "shape", "relation")


def region_group(name: str) -> str:
    """The ``REGION_GROUPS`` entry of region ``name``."""
    words = name.split()
    if words[0] in ("background", "digit", "bar", "count"):
        return words[0]
    return "relation" if words[-1] in RELATIONS else "shape"


PHOTO = 0.45  # weight of the photograph in a background (the rest is flat grey)


def make_item(split: str, index: int, task: str | None = None, photo: float = PHOTO, tiles: int = 1) -> Item:
    """The ``index``-th item of ``split``; tasks cycle unless ``task`` is given.

    Only training changes the last two, as a curriculum: ``photo`` is the
    photograph's weight in the background (a flat background first, then the
    photo fades in); ``tiles`` prints a text label as a ``tiles x tiles`` block
    of identical cells, so a model learning from scratch first meets the answer
    on many tokens, not one in 256.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    task = task or TASKS[index % len(TASKS)]
    seed = zlib.crc32(f"{split}/{task}/{index}".encode())
    rng = np.random.default_rng(seed)
    return _RENDERERS[task](split, rng, photo, tiles)


def items(split: str, count: int, tasks: tuple[str, ...] = TASKS, start: int = 0, photo: float = PHOTO,
          tiles: int = 1) -> list[Item]:
    """``count`` items of ``split``, the tasks interleaved, numbered from ``start``."""
    return [make_item(split, start + i, tasks[i % len(tasks)], photo, tiles) for i in range(count)]


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
    top, bottom = cy - r, cy + r * 0.9
    half = (_YY - top) / (bottom - top) * r * 1.05
    return (_YY >= top) & (_YY <= bottom) & (np.abs(_XX - cx) <= half)


def _draw(image: np.ndarray, regions: np.ndarray, region: str, kind: str, color: str, cell: tuple[int, int]) -> None:
    """A shape filling the 2 x 2 patch box whose top-left patch is ``cell`` (row, column): every
    patch it covers shows part of its outline, so each of its visual tokens shows its kind."""
    cy, cx = (cell[0] + 1) * CELL, (cell[1] + 1) * CELL
    r = CELL - 3
    mask = _shape_mask(kind, cy, cx, r)
    edge = _shape_mask(kind, cy, cx, r + 2) & ~mask
    image[edge] = INK
    image[mask] = COLORS[color]
    regions[mask | edge] = _REGION[region]


def _blank() -> np.ndarray:
    return np.zeros((SIZE, SIZE), dtype=np.uint8)


def _cells(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    """``n`` top-left patches of 2 x 2 shape boxes, at least one patch of background between boxes."""
    while True:
        cells = [tuple(int(v) for v in rng.integers(0, CELLS - 1, 2)) for _ in range(n)]
        if all(max(abs(p[0] - q[0]), abs(p[1] - q[1])) >= 3 for i, p in enumerate(cells) for q in cells[:i]):
            return cells


@cache
def _printed(text: str, size: int, stroke: int, y: float = CELL / 2) -> np.ndarray:
    """``text`` printed in INK, centred at row ``y`` of a CELL x CELL patch of LABEL grey (Pillow's font)."""
    from PIL import Image, ImageDraw, ImageFont

    cell = Image.new("L", (CELL, CELL), LABEL)
    ImageDraw.Draw(cell).text((CELL / 2, y), text, font=ImageFont.load_default(size=size), fill=INK,
                              anchor="mm", stroke_width=stroke, stroke_fill=INK)
    return np.asarray(cell)


# --- tasks ---------------------------------------------------------------------------------------

def _text(split: str, rng: np.random.Generator, photo: float, tiles: int) -> Item:
    image = _background(split, rng, photo)
    while True:  # a printed digit filling one patch-aligned cell of a grey label; the overlay belongs to one split
        digit, size, stroke = int(rng.integers(10)), int(rng.integers(12, 15)), int(rng.integers(2))
        row, col = (int(v) for v in rng.integers(0, CELLS - tiles + 1, 2))
        key = f"text{digit}/{size}/{stroke}/{row}/{col}"
        if _split_of_key(key) == split:
            break
    y, x, side = row * CELL, col * CELL, tiles * CELL
    image[y:y + side, x:x + side] = np.tile(_printed(str(digit), size, stroke), (tiles, tiles))[..., None]
    regions = _blank()
    regions[y:y + side, x:x + side] = _REGION[f"digit {digit}"]
    return Item("text", image, "what digit is on the label ?", str(digit), key, regions=regions)


def _chart(split: str, rng: np.random.Generator, photo: float, tiles: int) -> Item:
    while True:
        values = tuple(int(v) for v in rng.integers(1, 10, 4))
        if _split_of_key(str(values)) == split:
            break
    colors = [str(c) for c in rng.permutation(BAR_COLORS)]
    image = np.full((SIZE, SIZE, 3), LABEL, dtype=np.uint8)
    regions = _blank()
    base = (CELLS - 1) * CELL  # the x axis; bars stand on it, one cell wide, one cell per unit
    image[base:base + 2, CELL // 2:SIZE - CELL // 2] = INK
    image[CELL:base + 2, CELL // 2:CELL // 2 + 2] = INK
    first, gap = int(rng.integers(2, 4)), int(rng.integers(3, 5))
    size = int(rng.integers(11, 13))
    for i, (value, color) in enumerate(zip(values, colors)):
        x = (first + i * gap) * CELL
        top = base - value * CELL
        # The data label sits on its bar: the bar's top rows reach into the label's cell, so one
        # visual token shows both the value and the colour that names the bar.
        image[top - CELL:top, x:x + CELL] = _printed(str(value), size, 0, y=(CELL - BAR_IN_LABEL) / 2)[..., None]
        image[top - BAR_IN_LABEL:base, x:x + CELL] = COLORS[color]
        regions[top - CELL:base, x:x + CELL] = _REGION[f"bar {color} {value}"]
    asked = int(rng.integers(4))
    pairs = [(f"what is the value of the {c} bar ?", str(v)) for c, v in zip(colors, values)]
    question, answer = pairs.pop(asked)
    return Item("chart", image, question, answer, f"chart{values}{colors}{first}/{gap}/{size}", tuple(pairs), regions)


def _count(split: str, rng: np.random.Generator, photo: float, tiles: int) -> Item:
    image = _background(split, rng, photo)
    while True:
        n = int(rng.integers(1, MAX_COUNT + 1))
        color, kind = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        cells = _cells(rng, n)
        key = f"count{sorted(cells)}{color}{kind}"
        if _split_of_key(key) == split:
            break
    regions = _blank()
    for cell in cells:
        _draw(image, regions, f"count {n}", kind, color, cell)
    return Item("count", image, "how many shapes are there ?", str(n), key, regions=regions)


def _color(split: str, rng: np.random.Generator, photo: float, tiles: int) -> Item:
    image = _background(split, rng, photo)
    while True:
        kinds = [str(k) for k in rng.permutation(SHAPES)]
        colors = [str(c) for c in rng.choice(list(COLORS), len(kinds), replace=False)]
        cells = _cells(rng, len(kinds))
        key = f"color{cells}{kinds}{colors}"
        if _split_of_key(key) == split:
            break
    regions = _blank()
    for kind, color, cell in zip(kinds, colors, cells):
        _draw(image, regions, f"{color} {kind}", kind, color, cell)
    pairs = [(f"what colour is the {k} ?", c) for k, c in zip(kinds, colors)]
    question, answer = pairs.pop(int(rng.integers(len(pairs))))
    relations = [(f"where is the {kinds[i]} relative to the {kinds[j]} ?", relation)
                 for i in range(3) for j in range(3) if i != j
                 for relation in [_relation(cells[i], cells[j])] if relation]
    return Item("color", image, question, answer, key, tuple(pairs + relations), regions)


def _spatial(split: str, rng: np.random.Generator, photo: float, tiles: int) -> Item:
    image = _background(split, rng, photo)
    while True:
        a, b = (str(s) for s in rng.choice(SHAPES, 2, replace=False))
        ca, cb = (str(c) for c in rng.choice(list(COLORS), 2, replace=False))
        relation = str(rng.choice(RELATIONS))
        (ya, xa), (yb, xb) = _cells(rng, 2)
        key = f"spatial{a}{ca}{ya},{xa}/{b}{cb}{yb},{xb}"
        if _relation((ya, xa), (yb, xb)) == relation and _split_of_key(key) == split:
            break
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}[relation]
    regions = _blank()
    _draw(image, regions, f"{ca} {a} {relation}", a, ca, (ya, xa))
    _draw(image, regions, f"{cb} {b} {opposite}", b, cb, (yb, xb))
    return Item("spatial", image, f"where is the {a} relative to the {b} ?", relation, key,
                ((f"where is the {b} relative to the {a} ?", opposite), (f"what colour is the {a} ?", ca),
                 (f"what colour is the {b} ?", cb)), regions)


def _relation(p: tuple[int, int], q: tuple[int, int]) -> str | None:
    """Where the box at cell ``p`` is relative to the one at ``q``, if one relation clearly holds:
    at least 4 cells apart along its axis, and at most half that across it."""
    dy, dx = p[0] - q[0], p[1] - q[1]
    along, across, names = (dx, dy, ("left", "right")) if abs(dx) >= abs(dy) else (dy, dx, ("above", "below"))
    if abs(along) < 4 or 2 * abs(across) > abs(along):
        return None
    return names[along > 0]


_RENDERERS = {"text": _text, "chart": _chart, "count": _count, "color": _color, "spatial": _spatial}


def _split_of_key(key: str) -> str:
    """A fixed split for a discrete overlay: 10% test, 10% validation, 80% train."""
    bucket = hashlib.sha256(key.encode()).digest()[0] % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"
