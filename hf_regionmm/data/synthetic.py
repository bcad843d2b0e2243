"""Procedural synthetic region data: scenes, videos, point clouds and 3D scenes (data issue, item 1).

The machines this library is developed and tested on have no Hub access, so every system trains and is evaluated on
data made here, in the formats the four papers use:

* **Groma** (grounded chat, reference prompt formats in ``reference/original_repos.md`` §1c): grounded captions
  ``<p>phrase</p><roi><rK></roi>``, REC turns ``Locate <p>...</p> in the image.`` -> ``<roi><rK></roi>``, "Locate all
  ..." multi-grounding, and chats whose grounded-caption turn starts with ``[grounding]``.
* **RegionBLIP** (§3, I-region / P-text / P-region-text data): region captions, point-cloud captions (Objaverse/Cap3D
  style single primitives) and ScanRefer-style 3D scenes with axis-aligned boxes and referring expressions.
* **TAP-v2** (§3.1, SemanticSA-1B): instance masks plus a soft concept distribution over :data:`CONCEPT_VOCABULARY`
  per object, the target of the KL concept loss, and region captions.
* **u-LLaVA** (§3.3 and its appendix, §4c of the reference): RES / REC / salient / semantic instructions answered in
  the ``Sure. Mask: [SEG]; Location: [LOC]; [tag]...[/tag].`` formats, and captioned videos of moving shapes.

Conventions shared by every generator:

* Image boxes are **absolute pixel xyxy float32** of their own image, pixel-edge convention: a visible mask whose
  columns run from ``c0`` to ``c1`` (inclusive) has ``x1 = c0`` and ``x2 = c1 + 1``; rows likewise. So
  ``0 <= x1 < x2 <= width`` and ``0 <= y1 < y2 <= height`` always hold.
* Objects are painted in order, later ones over earlier ones. ``masks`` hold the **visible** pixels and ``boxes`` are
  the boxes of those visible masks. An object whose placement would leave any object (itself included) with less
  than half of its own pixels visible, or fewer than :data:`MIN_VISIBLE_PIXELS`, is never drawn, so no annotated
  object is almost invisible and no unannotated object is in the image.
* ``<rK>`` in Groma-style text indexes ``boxes`` of the same example (``K`` = object index). A model whose region
  order differs (Groma puts its proposer's boxes first) remaps ``K`` to its own region order in its processor.
* Every split draws from its own random stream derived from ``(seed, split, generator kind, example index)``, so
  ``"train"``, ``"validation"`` and ``"test"`` never share an example, the same arguments give byte-identical data,
  and the first ``k`` examples do not depend on how many are generated.
* All text is lower case English built from the templates in this file; :func:`vocabulary_words` lists every word
  and punctuation token that can occur (special tokens such as ``<p>``, ``<r3>``, ``[SEG]`` excluded), so tests can
  build tiny word-level tokenizers. :func:`split_words` is the matching word splitter.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary: shapes, colours, sizes, concepts
# ---------------------------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "ellipse", "square", "rectangle", "triangle", "diamond", "star", "hexagon")
"""2D shape categories of :func:`generate_scenes` and :func:`generate_videos`."""

SHAPE_PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
    "pink": (240, 120, 180),
    "cyan": (40, 200, 210),
    "brown": (140, 85, 40),
    "black": (25, 25, 25),
}
"""Nominal RGB of every colour name. Painted colours jitter by at most :data:`COLOR_JITTER` per channel."""

COLORS: tuple[str, ...] = tuple(COLOR_RGB)
SIZES: tuple[str, ...] = ("small", "medium", "large")

POINT_CLOUD_SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid")
"""3D primitives of :func:`generate_point_clouds` and :func:`generate_3d_scenes`."""

CONCEPT_VOCABULARY: tuple[str, ...] = (
    *SHAPES,
    *COLORS,
    *(f"{color} {shape}" for color in COLORS for shape in SHAPES),
)
"""Concepts of ``concept_targets`` (TAP-v2 §3.1): every shape, every colour, then every ``"{color} {shape}"``."""

COLOR_JITTER = 12
MIN_VISIBLE_PIXELS = 48
MIN_VISIBLE_FRACTION = 0.5
MAX_OBJECTS = 12

SPECIAL_TOKENS: tuple[str, ...] = (
    "<p>",
    "</p>",
    "<roi>",
    "</roi>",
    "[grounding]",
    "[SEG]",
    "[LOC]",
    "[tag]",
    "[/tag]",
)
"""Special tokens the generated text uses, besides Groma's region tokens ``<r0>`` ... ``<r{MAX_OBJECTS - 1}>``."""

_SPECIAL_TOKEN_RE = re.compile(r"<r\d+>|</?p>|</?roi>|\[grounding\]|\[SEG\]|\[LOC\]|\[/?tag\]")
_WORD_RE = re.compile(r"[A-Za-z]+|\d+|[^\w\s]")

_NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)
_ORDINALS = (
    "first",
    "second",
    "third",
    "fourth",
    "fifth",
    "sixth",
    "seventh",
    "eighth",
    "ninth",
    "tenth",
    "eleventh",
    "twelfth",
)

# Shapes a CLIP-like scorer would confuse; they receive some concept mass (TAP-v2's targets are soft, not one-hot).
_SIMILAR_SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("ellipse",),
    "ellipse": ("circle",),
    "square": ("rectangle", "diamond"),
    "rectangle": ("square",),
    "triangle": ("diamond",),
    "diamond": ("square", "triangle"),
    "star": ("hexagon",),
    "hexagon": ("circle", "star"),
}

# Extents as a fraction of min(width, height): the full nominal width of a shape of each size class.
_SIZE_FRACTIONS = {"small": (0.14, 0.22), "medium": (0.26, 0.36), "large": (0.40, 0.52)}

# ---------------------------------------------------------------------------------------------------------------------
# Text templates (every literal word of generated text comes from here or from the attribute names above)
# ---------------------------------------------------------------------------------------------------------------------

_IMAGE_CAPTION = "An image of {objects}."
_RELATION_SENTENCE = " {target} is {relation} {anchor}."
_RELATIONS_2D = (("left of", 0, -1), ("right of", 0, 1), ("above", 1, -1), ("below", 1, 1))
_ORDINAL_AXES_2D = (("from the left", 0, False), ("from the right", 0, True), ("from the top", 1, False))
_ORDINAL_AXES_2D = (*_ORDINAL_AXES_2D, ("from the bottom", 1, True))
_RELATIONS_3D = (("left of", 0, -1), ("right of", 0, 1), ("in front of", 1, -1), ("behind", 1, 1))
_ORDINAL_AXES_3D = (("from the left", 0, False), ("from the right", 0, True), ("from the front", 1, False))
_ORDINAL_AXES_3D = (*_ORDINAL_AXES_3D, ("from the back", 1, True))

_VQA_COUNT_ALL = "How many shapes are there?"
_VQA_COUNT_SHAPE = "How many {plural} are there?"
_VQA_COUNT_COLOR = "How many {color} shapes are there?"
_VQA_COLOR = "What color is the {description}?"
_VQA_SHAPE = "What shape is the {color} object?"

# Groma's grounded-caption, REC, region-caption and "all instances" request wording (original_repos.md §1c).
_GROUNDED_CAPTION_PROMPTS = (
    "Give me a concise description of the image.",
    "Briefly describe the image.",
    "Describe this image in one sentence.",
    "Write a short caption for the image.",
    "What does this image show?",
)
_REC_PROMPTS = (
    "Locate {} in the image.",
    "Can you spot {} in the photograph?",
    "Identify where {} is located in the picture.",
    "Please detect {} in the picture.",
    "Which region matches the description {}?",
    "Please identify the object that corresponds to {}.",
)
_REGION_CAPTION_PROMPTS = (
    "What is {}?",
    "Please briefly describe {}.",
    "Provide a short description for {}.",
    "Please give a concise description of region {}.",
)
_MULTI_GROUNDING_PROMPTS = (
    "Locate all {} in the image.",
    "Identify all instances of {} in the photo.",
    "Find all instances of {} in the image.",
    "Point out all the {} visible in this picture.",
)
_MULTI_GROUNDING_COLOR_PHRASE = "{color} shapes"

# u-LLaVA request templates (dataset/templates/SEG.json, those that read "the <class>") and answer formats (§4c).
_ULLAVA_SEG_PROMPTS = (
    "Can you segment and locate the {cls} in this image?",
    "Please segment and locate the {cls} in this image.",
    "Find the {cls} in the picture.",
    "Can you help me to find the {cls} in the image?",
    "Output the mask and bounding box (bbox) of the {cls} in the image?",
    "Look at the image, segment and locate the {cls} in the picture.",
    "Where is the {cls}?",
)
_ULLAVA_REC_PROMPTS = (
    "Please locate the {cls} in this image.",
    "Where is the {cls}? Please output the bounding box.",
    "Output the bounding box (bbox) of the {cls} in the image.",
)
_ULLAVA_SALIENT_PROMPTS = (
    "Find the salient object in the image.",
    "What is salient one in this image?",
    "Look at the image, segment the main object in the picture and explain.",
)
_ULLAVA_RES_ANSWER = "Sure. Mask: [SEG]; Location: [LOC]; [tag]{tag}[/tag]."
_ULLAVA_REC_ANSWER = "Sure. Location: [LOC]; [tag]{tag}[/tag]."
_ULLAVA_SEMANTIC_ANSWER = "Sure. Info: [SEG]; Location: [LOC]; [tag]{tag}[/tag]."
_ULLAVA_SALIENT_ANSWER = "Sure. Mask: [SEG]; Location: [LOC]; [tag]{tag}[/tag]. Explanation: {reason}"
_ULLAVA_SALIENT_REASON = "the {description} is the largest shape in the image."

_MOTIONS: dict[str, tuple[str, str, tuple[int, int]]] = {
    "right": ("moves to the right", "to the right", (1, 0)),
    "left": ("moves to the left", "to the left", (-1, 0)),
    "up": ("moves up", "up", (0, -1)),
    "down": ("moves down", "down", (0, 1)),
}
_VIDEO_QUESTION = "Where does the {description} move?"
_VIDEO_CAPTION_JOIN = " and "

_SCENE_3D_CAPTION = "A scene with {objects}."

_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
_KIND_CODES = {"scenes": 11, "videos": 12, "point_clouds": 13, "scenes_3d": 14}


def split_words(text: str) -> list[str]:
    """Split generated text into the word and punctuation tokens :func:`vocabulary_words` lists.

    Special tokens (:data:`SPECIAL_TOKENS` and ``<rK>``) are removed first; what remains splits into runs of letters,
    runs of digits and single punctuation characters: ``"Sure. Mask: [SEG];"`` -> ``["Sure", ".", "Mask", ":", ";"]``.
    """
    return _WORD_RE.findall(_SPECIAL_TOKEN_RE.sub(" ", text))


def vocabulary_words() -> list[str]:
    """Every word or punctuation token that can occur in text this module generates, sorted, special tokens excluded.

    Case is kept (``"An"``, ``"Sure"`` and ``"the"`` are distinct entries). Built from the templates and attribute
    names of this module, so it stays complete when they change.
    """
    templates = [
        _IMAGE_CAPTION,
        _RELATION_SENTENCE,
        _VQA_COUNT_ALL,
        _VQA_COUNT_SHAPE,
        _VQA_COUNT_COLOR,
        _VQA_COLOR,
        _VQA_SHAPE,
        *_GROUNDED_CAPTION_PROMPTS,
        *_REC_PROMPTS,
        *_REGION_CAPTION_PROMPTS,
        *_MULTI_GROUNDING_PROMPTS,
        _MULTI_GROUNDING_COLOR_PHRASE,
        *_ULLAVA_SEG_PROMPTS,
        *_ULLAVA_REC_PROMPTS,
        *_ULLAVA_SALIENT_PROMPTS,
        _ULLAVA_RES_ANSWER,
        _ULLAVA_REC_ANSWER,
        _ULLAVA_SEMANTIC_ANSWER,
        _ULLAVA_SALIENT_ANSWER,
        _ULLAVA_SALIENT_REASON,
        _VIDEO_QUESTION,
        _VIDEO_CAPTION_JOIN,
        _SCENE_3D_CAPTION,
        *(phrase for motion in _MOTIONS.values() for phrase in motion[:2]),
        *(phrase for phrase, _, _ in _RELATIONS_2D + _RELATIONS_3D),
        *(phrase for phrase, _, _ in _ORDINAL_AXES_2D + _ORDINAL_AXES_3D),
    ]
    fillers = [
        *SHAPES,
        *SHAPE_PLURALS.values(),
        *COLORS,
        *SIZES,
        *POINT_CLOUD_SHAPES,
        *_NUMBER_WORDS,
        *_ORDINALS,
        *(str(count) for count in range(MAX_OBJECTS + 1)),
        # Articles and joins the builders add around fillers: "a large red circle", "the red circle", "A, B and C".
        "a",
        "the",
        "The",
        "and",
        ",",
        ".",
    ]
    words: set[str] = set(fillers)
    for template in templates:
        words.update(split_words(re.sub(r"\{[a-z_]*\}", " ", template)))
    return sorted(words)


# ---------------------------------------------------------------------------------------------------------------------
# Argument checks and random streams
# ---------------------------------------------------------------------------------------------------------------------


def _check_count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be a non-negative int; got {type(value).__name__} {value!r}.")
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0; got {value}. Pass how many examples to generate.")
    return int(value)


def _check_int(value: object, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int; got {type(value).__name__} {value!r}.")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be {bound}; got {value}.")
    return int(value)


def _check_split(split: object) -> str:
    if split not in _SPLIT_CODES:
        raise ValueError(f"`split` must be one of {sorted(_SPLIT_CODES)}; got {split!r}.")
    return str(split)


def _check_object_range(min_objects: object, max_objects: object, low: int, high: int) -> tuple[int, int]:
    min_objects = _check_int(min_objects, "min_objects", low, high)
    max_objects = _check_int(max_objects, "max_objects", low, high)
    if min_objects > max_objects:
        raise ValueError(
            f"`min_objects` ({min_objects}) must be <= `max_objects` ({max_objects}). Swap or widen the range."
        )
    return min_objects, max_objects


def _example_rng(kind: str, seed: int, split: str, index: int) -> np.random.Generator:
    # One stream per example: splits and generator kinds never share a stream, and example i does not depend on how
    # many examples are generated.
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split], _KIND_CODES[kind], index]))


# ---------------------------------------------------------------------------------------------------------------------
# Masks: COCO uncompressed RLE
# ---------------------------------------------------------------------------------------------------------------------


def encode_rle(mask: np.ndarray) -> list[int]:
    """Encode one binary mask as COCO-style uncompressed RLE counts.

    Args:
        mask: ``(height, width)`` bool (or 0/1) array in image pixel coordinates.

    Returns:
        Run lengths over the mask flattened in **column-major** (Fortran) order, alternating background / foreground
        and starting with a (possibly zero) background run, exactly as ``pycocotools`` expects for
        ``{"size": [height, width], "counts": counts}``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"`mask` must be a 2D (height, width) array; got shape {mask.shape}.")
    flat = mask.astype(bool).ravel(order="F")
    if flat.size == 0:
        return []
    change_points = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], change_points, [flat.size])))
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return runs.astype(np.int64).tolist()


def decode_rle(counts: list[int] | np.ndarray, height: int, width: int) -> np.ndarray:
    """Decode COCO uncompressed RLE ``counts`` (see :func:`encode_rle`) to a ``(height, width)`` bool mask."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("`counts` must be a flat list of non-negative run lengths (COCO uncompressed RLE).")
    if int(counts.sum()) != height * width:
        raise ValueError(
            f"RLE `counts` sum to {int(counts.sum())} but the mask has height * width = {height * width} pixels; "
            "pass the height and width of the image the mask was encoded for."
        )
    values = np.arange(counts.size) % 2 == 1
    return np.repeat(values, counts).reshape(width, height).T


def decode_masks(example: Mapping) -> np.ndarray:
    """Decode the instance masks of one :func:`generate_scenes` example.

    Args:
        example: a row of the scene data set (a mapping with ``masks``, ``height`` and ``width``).

    Returns:
        ``(num_objects, height, width)`` bool array of the **visible** pixels of each object, in ``boxes`` order and
        in the pixel frame of the example's image. Masks of one scene never overlap.
    """
    if "masks" not in example:
        raise ValueError(
            "`example` has no 'masks' column; generate the scenes with `with_masks=True` to get instance masks."
        )
    height, width = int(example["height"]), int(example["width"])
    masks = [decode_rle(counts, height, width) for counts in example["masks"]]
    if not masks:
        return np.zeros((0, height, width), dtype=bool)
    return np.stack(masks)


def _mask_box(mask: np.ndarray) -> list[float]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


# ---------------------------------------------------------------------------------------------------------------------
# 2D shapes: outlines and rasterisation
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outline:
    """A shape centred on the origin: an axis-aligned ellipse ``(a, b)`` half axes, or polygon vertices ``(k, 2)``."""

    kind: str
    half_axes: tuple[float, float] = (0.0, 0.0)
    points: np.ndarray | None = None

    def half_extent(self) -> tuple[float, float]:
        if self.kind == "ellipse":
            return self.half_axes
        return float(np.abs(self.points[:, 0]).max()), float(np.abs(self.points[:, 1]).max())


def _regular_polygon(num_vertices: int, radius: float, angle: float) -> np.ndarray:
    angles = angle + 2 * np.pi * np.arange(num_vertices) / num_vertices
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    cos, sin = math.cos(angle), math.sin(angle)
    return points @ np.array([[cos, sin], [-sin, cos]])


def _sample_outline(shape: str, extent: float, rng: np.random.Generator) -> _Outline:
    """Outline of ``shape`` whose nominal width is ``2 * extent`` pixels, with its random aspect and tilt."""
    if shape == "circle":
        return _Outline("ellipse", (extent, extent))
    if shape == "ellipse":
        minor = extent / rng.uniform(1.5, 2.0)
        return _Outline("ellipse", (extent, minor) if rng.random() < 0.5 else (minor, extent))
    if shape == "square":
        half = 0.85 * extent
        return _Outline("polygon", points=np.array([[-half, -half], [half, -half], [half, half], [-half, half]]))
    if shape == "rectangle":
        minor = extent / rng.uniform(1.7, 2.3)
        half_w, half_h = (extent, minor) if rng.random() < 0.5 else (minor, extent)
        return _Outline(
            "polygon", points=np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
        )
    if shape == "triangle":
        points = np.array([[0.0, -extent], [extent, 0.8 * extent], [-extent, 0.8 * extent]])
        return _Outline("polygon", points=_rotate(points, rng.uniform(-0.2, 0.2)))
    if shape == "diamond":
        return _Outline(
            "polygon", points=np.array([[0.0, -extent], [0.65 * extent, 0.0], [0.0, extent], [-0.65 * extent, 0.0]])
        )
    if shape == "star":
        angle = -np.pi / 2 + rng.uniform(-0.2, 0.2)
        points = np.empty((10, 2))
        points[0::2] = _regular_polygon(5, extent, angle)
        points[1::2] = _regular_polygon(5, 0.45 * extent, angle + np.pi / 5)
        return _Outline("polygon", points=points)
    if shape == "hexagon":
        return _Outline("polygon", points=_regular_polygon(6, extent, rng.uniform(0, np.pi / 3)))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}.")


def _rasterize(
    outline: _Outline, center_x: float, center_y: float, width: int, height: int
) -> tuple[int, int, np.ndarray]:
    """Pixels covered by ``outline`` centred at ``(center_x, center_y)``, as ``(x0, y0, crop)`` with a bool crop."""
    if outline.kind == "ellipse":
        half_w, half_h = outline.half_axes
        xs, ys = (center_x - half_w, center_x + half_w), (center_y - half_h, center_y + half_h)
    else:
        vertices = outline.points + (center_x, center_y)
        xs, ys = vertices[:, 0], vertices[:, 1]
    x0, y0 = max(int(math.floor(min(xs))), 0), max(int(math.floor(min(ys))), 0)
    x1, y1 = min(int(math.ceil(max(xs))) + 1, width), min(int(math.ceil(max(ys))) + 1, height)
    if x1 <= x0 or y1 <= y0:
        return x0, y0, np.zeros((0, 0), dtype=bool)
    canvas = Image.new("1", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(canvas)
    if outline.kind == "ellipse":
        draw.ellipse([xs[0] - x0, ys[0] - y0, xs[1] - x0, ys[1] - y0], fill=1)
    else:
        draw.polygon([(float(x) - x0, float(y) - y0) for x, y in vertices], fill=1)
    return x0, y0, np.asarray(canvas, dtype=bool)


def _jittered_rgb(color: str, rng: np.random.Generator) -> np.ndarray:
    base = np.array(COLOR_RGB[color], dtype=np.int64)
    return np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3), 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    # A light, low-saturation gradient: far from every object colour, so colour names stay unambiguous.
    level = rng.uniform(185, 235)
    tint = rng.uniform(-10, 10, size=3)
    gradient = rng.uniform(-15, 15)
    rows = np.linspace(0.0, 1.0, height, dtype=np.float64)[:, None]
    column = np.clip(level + tint[None, :] + gradient * rows, 0, 255).astype(np.uint8)
    return np.broadcast_to(column[:, None, :], (height, width, 3)).copy()


def _encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Flat-colour images compress well at level 1 already; higher levels only cost time.
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# Scene layout
# ---------------------------------------------------------------------------------------------------------------------


def _sample_attribute(options: tuple[str, ...], existing: list[str], copy_probability: float, rng) -> str:
    # Repeating an attribute already in the scene is what makes "the red circle" ambiguous and forces spatial and
    # ordinal expressions, as in RefCOCO.
    if existing and rng.random() < copy_probability:
        return existing[int(rng.integers(len(existing)))]
    return options[int(rng.integers(len(options)))]


def _layout_scene(rng: np.random.Generator, width: int, height: int, num_objects: int, min_objects: int):
    """Place up to ``num_objects`` shapes: ``(label_map, objects)``, or ``None`` when fewer than ``min_objects`` fit.

    ``label_map`` is ``(height, width)`` int16: 0 background, ``k + 1`` for the visible pixels of object ``k``.
    """
    label_map = np.zeros((height, width), dtype=np.int16)
    objects: list[dict] = []
    full_areas: list[int] = []
    visible = np.zeros(0, dtype=np.int64)
    short_side = min(width, height)
    for _ in range(num_objects):
        shape = _sample_attribute(SHAPES, [o["shape"] for o in objects], 0.35, rng)
        color = _sample_attribute(COLORS, [o["color"] for o in objects], 0.3, rng)
        rgb = _jittered_rgb(color, rng)
        placed = False
        for attempt in range(40):
            # Later attempts fall back to small shapes so crowded scenes still fill up.
            size = SIZES[int(rng.integers(3))] if attempt < 20 else "small"
            low, high = _SIZE_FRACTIONS[size]
            extent = rng.uniform(low, high) * short_side / 2
            outline = _sample_outline(shape, extent, rng)
            half_w, half_h = outline.half_extent()
            if 2 * half_w + 2 >= width or 2 * half_h + 2 >= height:
                continue
            center_x = rng.uniform(half_w + 1, width - half_w - 1)
            center_y = rng.uniform(half_h + 1, height - half_h - 1)
            x0, y0, crop = _rasterize(outline, center_x, center_y, width, height)
            area = int(crop.sum())
            if area < MIN_VISIBLE_PIXELS:
                continue
            region = label_map[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]]
            covered = np.bincount(region[crop], minlength=len(objects) + 1)[1:]
            remaining = visible - covered
            if np.any(remaining < np.maximum(MIN_VISIBLE_FRACTION * np.asarray(full_areas), MIN_VISIBLE_PIXELS)):
                continue
            region[crop] = len(objects) + 1
            visible = np.append(remaining, area)
            full_areas.append(area)
            objects.append({"shape": shape, "color": color, "size": size, "rgb": rgb})
            placed = True
            break
        if not placed:
            break
    if len(objects) < min_objects:
        return None
    return label_map, objects


# ---------------------------------------------------------------------------------------------------------------------
# Text: descriptions, referring expressions, captions, VQA, chats, instructions
# ---------------------------------------------------------------------------------------------------------------------

_ATTRIBUTE_ORDER = ("size", "color", "shape")


@dataclass(frozen=True)
class _Geometry:
    """Axis-aligned extents along two axes: ``(n, 2)`` mins, maxs and centres (image x/y, or 3D x/y top view)."""

    mins: np.ndarray
    maxs: np.ndarray

    @property
    def centers(self) -> np.ndarray:
        return (self.mins + self.maxs) / 2


def _describe(obj: Mapping, keys: tuple[str, ...]) -> str:
    return " ".join(obj[key] for key in _ATTRIBUTE_ORDER if key in keys)


def _matching(objects: list[Mapping], reference: Mapping, keys: tuple[str, ...]) -> list[int]:
    return [j for j, obj in enumerate(objects) if all(obj[key] == reference[key] for key in keys)]


def _unique_keys(objects: list[Mapping], index: int, key_sets: tuple[tuple[str, ...], ...]) -> tuple[str, ...] | None:
    for keys in key_sets:
        if len(_matching(objects, objects[index], keys)) == 1:
            return keys
    return None


def _strict_relation(geometry: _Geometry, target: int, anchor: int, axis: int, sign: int) -> bool:
    if sign < 0:
        return bool(geometry.maxs[target, axis] <= geometry.mins[anchor, axis])
    return bool(geometry.mins[target, axis] >= geometry.maxs[anchor, axis])


def _loose_relation(geometry: _Geometry, target: int, anchor: int, axis: int, sign: int) -> bool:
    delta = geometry.centers[target, axis] - geometry.centers[anchor, axis]
    return bool(delta < 0 if sign < 0 else delta > 0)


def _referring_expressions(
    objects: list[Mapping],
    geometry: _Geometry,
    key_sets: tuple[tuple[str, ...], ...],
    relations: tuple[tuple[str, int, int], ...],
    ordinal_axes: tuple[tuple[str, int, bool], ...],
    min_gap: tuple[float, float],
    rng: np.random.Generator,
) -> list[dict]:
    """Unambiguous expressions per object: the shortest unique attribute phrase, one relation, one ordinal.

    A relation ``"the T <rel> the A"`` is emitted only when ``A`` is the one object matching its phrase, ``T`` is
    entirely on that side of ``A`` (box separation) and no other object matching ``T``'s phrase is even loosely (by
    centre) on that side, so box-based and centre-based readings both resolve to ``T``. An ordinal ``"the second T
    from the left"`` is emitted only when the centres of the objects matching ``T`` are at least ``min_gap`` apart.
    """
    expressions: list[dict] = []
    for index, obj in enumerate(objects):
        unique = _unique_keys(objects, index, key_sets)
        if unique is not None:
            expressions.append({"text": f"the {_describe(obj, unique)}", "object_index": index, "kind": "attribute"})

        informative, redundant = [], []
        for keys in key_sets:
            same = _matching(objects, obj, keys)
            for anchor in range(len(objects)):
                anchor_keys = _unique_keys(objects, anchor, key_sets) if anchor != index else None
                if anchor_keys is None:
                    continue
                for phrase, axis, sign in relations:
                    if not _strict_relation(geometry, index, anchor, axis, sign):
                        continue
                    others = [j for j in same if j not in (index, anchor)]
                    if any(_loose_relation(geometry, j, anchor, axis, sign) for j in others):
                        continue
                    text = f"the {_describe(obj, keys)} {phrase} the {_describe(objects[anchor], anchor_keys)}"
                    (informative if len(same) > 1 else redundant).append(text)
        pool = informative or redundant
        if pool:
            text = pool[int(rng.integers(len(pool)))]
            expressions.append({"text": text, "object_index": index, "kind": "relation"})

        ordinals = []
        for keys in key_sets:
            same = np.array(_matching(objects, obj, keys))
            if same.size < 2 or same.size > len(_ORDINALS):
                continue
            for phrase, axis, descending in ordinal_axes:
                coordinates = geometry.centers[same, axis]
                order = np.argsort(-coordinates if descending else coordinates, kind="stable")
                if np.abs(np.diff(coordinates[order])).min() < min_gap[axis]:
                    continue
                rank = int(np.flatnonzero(same[order] == index)[0])
                ordinals.append(f"the {_ORDINALS[rank]} {_describe(obj, keys)} {phrase}")
        if ordinals:
            text = ordinals[int(rng.integers(len(ordinals)))]
            expressions.append({"text": text, "object_index": index, "kind": "ordinal"})
    return expressions


def _join(items: list[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _region_tokens(indices: list[int]) -> str:
    return "<roi>" + "".join(f"<r{index}>" for index in indices) + "</roi>"


def _grounded(phrase: str, indices: list[int]) -> str:
    return f"<p>{phrase}</p>{_region_tokens(indices)}"


def _full_description(obj: Mapping) -> str:
    return _describe(obj, _ATTRIBUTE_ORDER)


def _captions(objects: list[dict], geometry: _Geometry, rng: np.random.Generator) -> tuple[str, str]:
    """``(image_caption, grounded_caption)``: the same text, the second with Groma's ``<p>..</p><roi>..</roi>`` tags.

    Objects sharing colour and shape are one phrase ("two red circles") grounded to all their boxes; phrases are
    ordered by their leftmost member. A relation sentence follows when two objects are separated along an axis.
    """
    groups: dict[tuple[str, str], list[int]] = {}
    for index in np.argsort(geometry.centers[:, 0], kind="stable").tolist():
        groups.setdefault((objects[index]["color"], objects[index]["shape"]), []).append(index)
    plain, grounded = [], []
    for (color, shape), members in groups.items():
        if len(members) == 1:
            phrase = f"a {_full_description(objects[members[0]])}"
        else:
            phrase = f"{_NUMBER_WORDS[len(members)]} {color} {SHAPE_PLURALS[shape]}"
        plain.append(phrase)
        grounded.append(_grounded(phrase, sorted(members)))
    image_caption = _IMAGE_CAPTION.format(objects=_join(plain))
    grounded_caption = _IMAGE_CAPTION.format(objects=_join(grounded))

    pairs = [
        (target, anchor, phrase)
        for target in range(len(objects))
        for anchor in range(len(objects))
        if target != anchor
        for phrase, axis, sign in _RELATIONS_2D
        if _strict_relation(geometry, target, anchor, axis, sign)
    ]
    if pairs:
        target, anchor, phrase = pairs[int(rng.integers(len(pairs)))]
        target_text = f"The {_full_description(objects[target])}"
        anchor_text = f"the {_full_description(objects[anchor])}"
        image_caption += _RELATION_SENTENCE.format(target=target_text, relation=phrase, anchor=anchor_text)
        grounded_caption += _RELATION_SENTENCE.format(
            target=_grounded(target_text, [target]), relation=phrase, anchor=_grounded(anchor_text, [anchor])
        )
    return image_caption, grounded_caption


def _vqa(objects: list[dict], rng: np.random.Generator) -> list[dict]:
    """Counting (all shapes, per shape incl. absent ones, per colour) and attribute questions with exact answers."""
    shapes = [o["shape"] for o in objects]
    colors = [o["color"] for o in objects]
    qa = [{"question": _VQA_COUNT_ALL, "answer": str(len(objects))}]
    present = sorted(set(shapes), key=SHAPES.index)
    absent = [shape for shape in SHAPES if shape not in present]
    asked = [present[int(i)] for i in rng.permutation(len(present))[:2]]
    if absent:
        asked.append(absent[int(rng.integers(len(absent)))])
    for shape in asked:
        qa.append(
            {"question": _VQA_COUNT_SHAPE.format(plural=SHAPE_PLURALS[shape]), "answer": str(shapes.count(shape))}
        )
    present_colors = sorted(set(colors), key=COLORS.index)
    for color in [present_colors[int(i)] for i in rng.permutation(len(present_colors))[:2]]:
        qa.append({"question": _VQA_COUNT_COLOR.format(color=color), "answer": str(colors.count(color))})
    color_questions, shape_questions = [], []
    for index, obj in enumerate(objects):
        keys = _unique_keys(objects, index, (("shape",), ("size", "shape")))
        if keys is not None:
            color_questions.append(
                {"question": _VQA_COLOR.format(description=_describe(obj, keys)), "answer": obj["color"]}
            )
        if colors.count(obj["color"]) == 1:
            shape_questions.append({"question": _VQA_SHAPE.format(color=obj["color"]), "answer": obj["shape"]})
    for pool, limit in ((color_questions, 2), (shape_questions, 1)):
        qa.extend(pool[int(i)] for i in rng.permutation(len(pool))[:limit])
    return qa


def _multi_grounding(objects: list[dict], rng: np.random.Generator) -> list[dict]:
    """Groma "all instances" queries: one per shape present, one per colour present, with every matching index."""
    queries = []
    for shape in sorted({o["shape"] for o in objects}, key=SHAPES.index):
        template = _MULTI_GROUNDING_PROMPTS[int(rng.integers(len(_MULTI_GROUNDING_PROMPTS)))]
        indices = [j for j, o in enumerate(objects) if o["shape"] == shape]
        queries.append({"query": template.format(SHAPE_PLURALS[shape]), "object_indices": indices})
    for color in sorted({o["color"] for o in objects}, key=COLORS.index):
        template = _MULTI_GROUNDING_PROMPTS[int(rng.integers(len(_MULTI_GROUNDING_PROMPTS)))]
        indices = [j for j, o in enumerate(objects) if o["color"] == color]
        queries.append(
            {"query": template.format(_MULTI_GROUNDING_COLOR_PHRASE.format(color=color)), "object_indices": indices}
        )
    return queries


def _choice(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def _grounded_chat(
    objects: list[dict],
    grounded_caption: str,
    expressions: list[dict],
    multi_grounding: list[dict],
    rng: np.random.Generator,
) -> list[dict]:
    """A Groma-Instruct-style chat: grounded caption (``[grounding]``), REC, region caption, "all instances"."""
    turns = [
        {"role": "user", "content": "[grounding] " + _choice(_GROUNDED_CAPTION_PROMPTS, rng)},
        {"role": "assistant", "content": grounded_caption},
    ]
    if expressions:
        expression = expressions[int(rng.integers(len(expressions)))]
        turns.append({"role": "user", "content": _choice(_REC_PROMPTS, rng).format(f"<p>{expression['text']}</p>")})
        turns.append({"role": "assistant", "content": _region_tokens([expression["object_index"]])})
    index = int(rng.integers(len(objects)))
    turns.append({"role": "user", "content": _choice(_REGION_CAPTION_PROMPTS, rng).format(_region_tokens([index]))})
    turns.append({"role": "assistant", "content": f"a {_full_description(objects[index])}"})
    query = multi_grounding[int(rng.integers(len(multi_grounding)))]
    turns.append({"role": "user", "content": query["query"]})
    turns.append({"role": "assistant", "content": _region_tokens(query["object_indices"])})
    return turns


def _ullava_instructions(
    objects: list[dict], expressions: list[dict], salient_index: int, rng: np.random.Generator
) -> list[dict]:
    """u-LLaVA instructions: RES and REC per object with an expression, one salient, one semantic per shape.

    ``[SEG]`` targets the union of the masks of ``object_indices`` and ``[LOC]`` the box of that union.
    """
    instructions = []
    by_object: dict[int, list[str]] = {}
    for expression in expressions:
        by_object.setdefault(expression["object_index"], []).append(expression["text"])
    for index in sorted(by_object):
        texts = by_object[index]
        # u-LLaVA's templates already say "the <class>", so the expression drops its own leading "the".
        tag = f"{objects[index]['color']} {objects[index]['shape']}"
        res_class = texts[int(rng.integers(len(texts)))].removeprefix("the ")
        rec_class = texts[int(rng.integers(len(texts)))].removeprefix("the ")
        instructions.append(
            {
                "task": "res",
                "instruction": _choice(_ULLAVA_SEG_PROMPTS, rng).format(cls=res_class),
                "answer": _ULLAVA_RES_ANSWER.format(tag=tag),
                "object_indices": [index],
            }
        )
        instructions.append(
            {
                "task": "rec",
                "instruction": _choice(_ULLAVA_REC_PROMPTS, rng).format(cls=rec_class),
                "answer": _ULLAVA_REC_ANSWER.format(tag=tag),
                "object_indices": [index],
            }
        )
    salient = objects[salient_index]
    reason = _ULLAVA_SALIENT_REASON.format(description=f"{salient['color']} {salient['shape']}")
    instructions.append(
        {
            "task": "salient",
            "instruction": _choice(_ULLAVA_SALIENT_PROMPTS, rng),
            "answer": _ULLAVA_SALIENT_ANSWER.format(tag=f"{salient['color']} {salient['shape']}", reason=reason),
            "object_indices": [salient_index],
        }
    )
    for shape in sorted({o["shape"] for o in objects}, key=SHAPES.index):
        instructions.append(
            {
                "task": "semantic",
                "instruction": _choice(_ULLAVA_SEG_PROMPTS, rng).format(cls=shape),
                "answer": _ULLAVA_SEMANTIC_ANSWER.format(tag=shape),
                "object_indices": [j for j, o in enumerate(objects) if o["shape"] == shape],
            }
        )
    return instructions


_CONCEPT_INDEX = {concept: i for i, concept in enumerate(CONCEPT_VOCABULARY)}
_CONCEPT_TABLE_CACHE: dict[tuple[str, str], list[float]] = {}


def concept_distribution(shape: str, color: str) -> np.ndarray:
    """Soft target over :data:`CONCEPT_VOCABULARY` for a ``color`` ``shape`` region: ``(len(CONCEPT_VOCABULARY),)``.

    Stands in for TAP-v2's CLIP prior (§3.1, Eq. 1): a softmax of fixed similarity logits, highest on
    ``"{color} {shape}"``, then the shape, the colour and visually similar shapes. Sums to 1, float32.
    """
    if shape not in SHAPES or color not in COLORS:
        raise ValueError(f"`shape` must be in {SHAPES} and `color` in {COLORS}; got {shape!r}, {color!r}.")
    logits = np.zeros(len(CONCEPT_VOCABULARY), dtype=np.float64)
    for similar in _SIMILAR_SHAPES[shape]:
        logits[_CONCEPT_INDEX[similar]] = 2.5
        logits[_CONCEPT_INDEX[f"{color} {similar}"]] = 3.0
    logits[_CONCEPT_INDEX[color]] = 3.5
    logits[_CONCEPT_INDEX[shape]] = 4.5
    logits[_CONCEPT_INDEX[f"{color} {shape}"]] = 6.0
    probabilities = np.exp(logits - logits.max())
    return (probabilities / probabilities.sum()).astype(np.float32)


def _concept_targets(shape: str, color: str) -> list[float]:
    key = (shape, color)
    if key not in _CONCEPT_TABLE_CACHE:
        _CONCEPT_TABLE_CACHE[key] = concept_distribution(shape, color).tolist()
    return _CONCEPT_TABLE_CACHE[key]


# ---------------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------------


def scene_features(with_masks: bool = True) -> datasets.Features:
    """``datasets.Features`` of :func:`generate_scenes` (``masks`` only when ``with_masks``)."""
    float_box = datasets.List(datasets.Value("float32"), length=4)
    strings = datasets.List(datasets.Value("string"))
    indices = datasets.List(datasets.Value("int32"))
    features = {
        "image": datasets.Image(),
        "scene_id": datasets.Value("string"),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "boxes": datasets.List(float_box),
        "masks": datasets.List(datasets.List(datasets.Value("int32"))),
        "categories": strings,
        "colors": strings,
        "sizes": strings,
        "concept_targets": datasets.List(datasets.List(datasets.Value("float32"), length=len(CONCEPT_VOCABULARY))),
        "region_captions": strings,
        "referring_expressions": datasets.List(
            {
                "text": datasets.Value("string"),
                "object_index": datasets.Value("int32"),
                "kind": datasets.Value("string"),
            }
        ),
        "image_caption": datasets.Value("string"),
        "vqa": datasets.List({"question": datasets.Value("string"), "answer": datasets.Value("string")}),
        "grounded_caption": datasets.Value("string"),
        "grounded_chat": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "multi_grounding": datasets.List({"query": datasets.Value("string"), "object_indices": indices}),
        "ullava_instructions": datasets.List(
            {
                "task": datasets.Value("string"),
                "instruction": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "object_indices": indices,
            }
        ),
        "salient_index": datasets.Value("int32"),
    }
    if not with_masks:
        del features["masks"]
    return datasets.Features(features)


def _make_scene(
    rng: np.random.Generator,
    scene_id: str,
    image_size_range: tuple[int, int],
    min_objects: int,
    max_objects: int,
    with_masks: bool,
) -> dict:
    for _ in range(50):
        width = int(rng.integers(image_size_range[0], image_size_range[1] + 1))
        height = int(rng.integers(image_size_range[0], image_size_range[1] + 1))
        layout = _layout_scene(rng, width, height, int(rng.integers(min_objects, max_objects + 1)), min_objects)
        if layout is not None:
            break
    else:
        raise RuntimeError(
            f"could not place {min_objects} objects in {image_size_range} images; lower `min_objects` or raise "
            "`image_size_range`."
        )
    label_map, objects = layout
    palette = np.concatenate([np.zeros((1, 3), np.uint8), np.stack([o["rgb"] for o in objects])])
    image = np.where(label_map[..., None] > 0, palette[label_map], _background(rng, width, height))

    masks = [label_map == k + 1 for k in range(len(objects))]
    boxes = [_mask_box(mask) for mask in masks]
    areas = [int(mask.sum()) for mask in masks]
    box_array = np.asarray(boxes, dtype=np.float64)
    geometry = _Geometry(box_array[:, :2], box_array[:, 2:])
    salient_index = int(np.argmax(areas))

    key_sets = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))
    min_gap = (max(4.0, 0.04 * width), max(4.0, 0.04 * height))
    expressions = _referring_expressions(objects, geometry, key_sets, _RELATIONS_2D, _ORDINAL_AXES_2D, min_gap, rng)
    image_caption, grounded_caption = _captions(objects, geometry, rng)
    multi_grounding = _multi_grounding(objects, rng)
    example = {
        "image": {"bytes": _encode_png(image), "path": None},
        "scene_id": scene_id,
        "width": width,
        "height": height,
        "boxes": boxes,
        "masks": [encode_rle(mask) for mask in masks] if with_masks else None,
        "categories": [o["shape"] for o in objects],
        "colors": [o["color"] for o in objects],
        "sizes": [o["size"] for o in objects],
        "concept_targets": [_concept_targets(o["shape"], o["color"]) for o in objects],
        "region_captions": [f"a {_full_description(o)}" for o in objects],
        "referring_expressions": expressions,
        "image_caption": image_caption,
        "vqa": _vqa(objects, rng),
        "grounded_caption": grounded_caption,
        "grounded_chat": _grounded_chat(objects, grounded_caption, expressions, multi_grounding, rng),
        "multi_grounding": multi_grounding,
        "ullava_instructions": _ullava_instructions(objects, expressions, salient_index, rng),
        "salient_index": salient_index,
    }
    if not with_masks:
        del example["masks"]
    return example


def generate_scenes(
    num_scenes: int,
    *,
    seed: int = 0,
    split: str = "train",
    image_size_range: tuple[int, int] = (224, 512),
    min_objects: int = 2,
    max_objects: int = 6,
    with_masks: bool = True,
) -> datasets.Dataset:
    """Generate ``num_scenes`` images of coloured shapes with every region annotation the four systems use.

    Args:
        num_scenes: how many scenes.
        seed: non-negative base seed; with ``split`` and the scene index it fixes every scene.
        split: ``"train"``, ``"validation"`` or ``"test"``; splits never share a scene.
        image_size_range: inclusive ``(low, high)`` for width and height, drawn independently, in pixels (>= 64).
        min_objects, max_objects: inclusive range of objects per scene (1 to :data:`MAX_OBJECTS`).
        with_masks: store the instance masks (``masks`` column) or not.

    Returns:
        A ``datasets.Dataset`` with :func:`scene_features`. Per scene: ``image`` (RGB PNG), ``boxes`` ``(n, 4)``
        absolute pixel xyxy float32 of the visible masks, ``masks`` COCO uncompressed RLE counts per object
        (column-major, see :func:`encode_rle`; decode with :func:`decode_masks`), ``categories`` / ``colors`` /
        ``sizes`` per object,
        ``concept_targets`` ``(n, len(CONCEPT_VOCABULARY))`` float32 rows summing to 1, ``region_captions``,
        ``referring_expressions`` (``text``, ``object_index``, ``kind`` in attribute/relation/ordinal),
        ``image_caption``, ``vqa``, Groma ``grounded_caption`` / ``grounded_chat`` / ``multi_grounding`` whose
        ``<rK>`` index ``boxes``, u-LLaVA ``ullava_instructions`` and ``salient_index`` (largest visible area).
    """
    num_scenes = _check_count(num_scenes, "num_scenes")
    seed = _check_int(seed, "seed", 0)
    split = _check_split(split)
    if (
        not isinstance(image_size_range, (tuple, list))
        or len(image_size_range) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_size_range)
    ):
        raise TypeError(f"`image_size_range` must be a (low, high) pair of ints; got {image_size_range!r}.")
    low, high = int(image_size_range[0]), int(image_size_range[1])
    if not 64 <= low <= high <= 4096:
        raise ValueError(f"`image_size_range` must satisfy 64 <= low <= high <= 4096; got {image_size_range!r}.")
    min_objects, max_objects = _check_object_range(min_objects, max_objects, 1, MAX_OBJECTS)
    if not isinstance(with_masks, bool):
        raise TypeError(f"`with_masks` must be a bool; got {with_masks!r}.")

    rows = [
        _make_scene(
            _example_rng("scenes", seed, split, index),
            f"scene-{split}-{seed}-{index:06d}",
            (low, high),
            min_objects,
            max_objects,
            with_masks,
        )
        for index in range(num_scenes)
    ]
    return _to_dataset(rows, scene_features(with_masks), split, "Synthetic coloured-shape scenes (hf_regionmm).")


def _to_dataset(rows: list[dict], features: datasets.Features, split: str, description: str) -> datasets.Dataset:
    info = datasets.DatasetInfo(description=description, features=features)
    if not rows:
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features, info=info, split=split)
    return datasets.Dataset.from_list(rows, features=features, info=info, split=split)


# ---------------------------------------------------------------------------------------------------------------------
# Videos
# ---------------------------------------------------------------------------------------------------------------------


def video_features() -> datasets.Features:
    """``datasets.Features`` of :func:`generate_videos`."""
    strings = datasets.List(datasets.Value("string"))
    return datasets.Features(
        {
            "video_id": datasets.Value("string"),
            "frames": datasets.List(datasets.Image()),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "boxes": datasets.List(datasets.List(datasets.List(datasets.Value("float32"), length=4))),
            "categories": strings,
            "colors": strings,
            "sizes": strings,
            "motions": strings,
            "object_captions": strings,
            "caption": datasets.Value("string"),
            "qa": datasets.List({"question": datasets.Value("string"), "answer": datasets.Value("string")}),
        }
    )


def _make_video(
    rng: np.random.Generator, video_id: str, num_frames: int, size: int, min_objects: int, max_objects: int
) -> dict:
    num_objects = int(rng.integers(min_objects, max_objects + 1))
    tracks: list[dict] = []
    for _ in range(200):
        if len(tracks) == num_objects:
            break
        shape, color = SHAPES[int(rng.integers(len(SHAPES)))], COLORS[int(rng.integers(len(COLORS)))]
        if any(t["shape"] == shape and t["color"] == color for t in tracks):
            continue
        size_name = SIZES[int(rng.integers(2))]  # small or medium: large shapes leave no room to move
        extent = rng.uniform(*_SIZE_FRACTIONS[size_name]) * size / 2
        outline = _sample_outline(shape, extent, rng)
        half_w, half_h = outline.half_extent()
        motion = tuple(_MOTIONS)[int(rng.integers(len(_MOTIONS)))]
        step_x, step_y = _MOTIONS[motion][2]
        travel = rng.uniform(0.25, 0.4) * size
        span_x, span_y = abs(step_x) * travel, abs(step_y) * travel
        if 2 * half_w + span_x + 4 >= size or 2 * half_h + span_y + 4 >= size:
            continue
        start_x = rng.uniform(half_w + 2, size - half_w - 2 - span_x) + (span_x if step_x < 0 else 0)
        start_y = rng.uniform(half_h + 2, size - half_h - 2 - span_y) + (span_y if step_y < 0 else 0)
        fractions = np.linspace(0.0, 1.0, num_frames)
        centers = np.stack([start_x + step_x * travel * fractions, start_y + step_y * travel * fractions], axis=1)
        # Tracks may not touch at any frame, so every box stays the box of a fully visible shape.
        lows, highs = centers - (half_w + 2, half_h + 2), centers + (half_w + 2, half_h + 2)
        if any(np.any(np.all((lows < t["highs"]) & (highs > t["lows"]), axis=1)) for t in tracks):
            continue
        tracks.append(
            {
                "shape": shape,
                "color": color,
                "size": size_name,
                "rgb": _jittered_rgb(color, rng),
                "outline": outline,
                "centers": centers,
                "lows": lows,
                "highs": highs,
                "motion": motion,
            }
        )
    if len(tracks) < min_objects:
        raise RuntimeError(
            f"could not fit {min_objects} non-touching moving objects in {size}x{size} frames; lower `min_objects` "
            "or raise `image_size`."
        )
    background = _background(rng, size, size)
    frames, boxes = [], []
    for t in range(num_frames):
        frame = background.copy()
        frame_boxes = []
        for track in tracks:
            x0, y0, crop = _rasterize(track["outline"], *track["centers"][t], size, size)
            frame[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]][crop] = track["rgb"]
            mask = np.zeros((size, size), dtype=bool)
            mask[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
            frame_boxes.append(_mask_box(mask))
        frames.append({"bytes": _encode_png(frame), "path": None})
        boxes.append(frame_boxes)
    object_captions = [f"a {_full_description(t)} {_MOTIONS[t['motion']][0]}" for t in tracks]
    return {
        "video_id": video_id,
        "frames": frames,
        "width": size,
        "height": size,
        "boxes": boxes,
        "categories": [t["shape"] for t in tracks],
        "colors": [t["color"] for t in tracks],
        "sizes": [t["size"] for t in tracks],
        "motions": [t["motion"] for t in tracks],
        "object_captions": object_captions,
        "caption": _VIDEO_CAPTION_JOIN.join(object_captions) + ".",
        "qa": [
            {"question": _VIDEO_QUESTION.format(description=_full_description(t)), "answer": _MOTIONS[t["motion"]][1]}
            for t in tracks
        ],
    }


def generate_videos(
    num_videos: int,
    *,
    seed: int = 0,
    split: str = "train",
    num_frames: int = 8,
    image_size: int = 224,
    min_objects: int = 1,
    max_objects: int = 2,
) -> datasets.Dataset:
    """Generate clips of shapes moving in a straight line (u-LLaVA-style video captioning data).

    Args:
        num_videos: how many clips.
        seed, split: as in :func:`generate_scenes`.
        num_frames: frames per clip (>= 2); objects move at constant speed from the first to the last frame.
        image_size: square frame side in pixels (>= 64).
        min_objects, max_objects: moving objects per clip (1 to 3); their colour + shape pairs are distinct.

    Returns:
        A ``datasets.Dataset`` with :func:`video_features`: ``frames`` (``num_frames`` RGB PNGs), ``boxes``
        ``(num_frames, n, 4)`` absolute pixel xyxy float32 per frame (objects never touch, so boxes are of the whole
        shape), ``motions`` (``"right"``, ``"left"``, ``"up"``, ``"down"``; image ``y`` grows downwards),
        ``caption`` ("a small red circle moves to the right."), ``object_captions`` and direction ``qa``.
    """
    num_videos = _check_count(num_videos, "num_videos")
    seed = _check_int(seed, "seed", 0)
    split = _check_split(split)
    num_frames = _check_int(num_frames, "num_frames", 2, 64)
    image_size = _check_int(image_size, "image_size", 64, 2048)
    min_objects, max_objects = _check_object_range(min_objects, max_objects, 1, 3)
    rows = [
        _make_video(
            _example_rng("videos", seed, split, index),
            f"video-{split}-{seed}-{index:06d}",
            num_frames,
            image_size,
            min_objects,
            max_objects,
        )
        for index in range(num_videos)
    ]
    return _to_dataset(rows, video_features(), split, "Synthetic videos of moving shapes (hf_regionmm).")


# ---------------------------------------------------------------------------------------------------------------------
# Point clouds: primitives sampled uniformly by area on their surface
# ---------------------------------------------------------------------------------------------------------------------

TORUS_MAJOR_RADIUS = 0.7
TORUS_MINOR_RADIUS = 0.3

# Canonical primitives all fit in [-1, 1]^3 with z up: unit sphere; cube [-1, 1]^3; cylinder of radius 1 over
# z in [-1, 1]; cone and square pyramid with base at z = -1 (radius / half side 1) and apex (0, 0, 1); torus around z
# with the radii above.
_CANONICAL_AREAS = {
    "sphere": 4 * math.pi,
    "cube": 24.0,
    "cylinder": 6 * math.pi,
    "cone": math.pi * (1 + math.sqrt(5)),
    "torus": 4 * math.pi**2 * TORUS_MAJOR_RADIUS * TORUS_MINOR_RADIUS,
    "pyramid": 4.0 + 4 * math.sqrt(5),
}
_CANONICAL_HALF_HEIGHT = {"torus": TORUS_MINOR_RADIUS}


def _sample_disk(count: int, rng: np.random.Generator) -> np.ndarray:
    radius, angle = np.sqrt(rng.random(count)), rng.uniform(0, 2 * np.pi, count)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def _sample_surface(shape: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """``(count, 3)`` float64 points uniform by area on the canonical ``shape`` surface."""
    if shape == "sphere":
        points = rng.normal(size=(count, 3))
        return points / np.linalg.norm(points, axis=1, keepdims=True)
    if shape == "cube":
        points = rng.uniform(-1, 1, size=(count, 3))
        face = rng.integers(6, size=count)
        points[np.arange(count), face % 3] = np.where(face < 3, -1.0, 1.0)
        return points
    if shape == "cylinder":
        points = np.empty((count, 3))
        on_side = rng.random(count) < 2 / 3  # side area 4*pi of 6*pi
        angle = rng.uniform(0, 2 * np.pi, count)
        points[:, 0], points[:, 1], points[:, 2] = np.cos(angle), np.sin(angle), rng.uniform(-1, 1, count)
        caps = ~on_side
        points[caps, :2] = _sample_disk(int(caps.sum()), rng)
        points[caps, 2] = np.where(rng.random(int(caps.sum())) < 0.5, -1.0, 1.0)
        return points
    if shape == "cone":
        points = np.empty((count, 3))
        on_side = rng.random(count) < math.sqrt(5) / (1 + math.sqrt(5))
        # Distance from the apex grows with the square root of a uniform: the side's area density is linear in it.
        radius, angle = np.sqrt(rng.random(count)), rng.uniform(0, 2 * np.pi, count)
        points[:, 0], points[:, 1], points[:, 2] = radius * np.cos(angle), radius * np.sin(angle), 1 - 2 * radius
        base = ~on_side
        points[base, :2] = _sample_disk(int(base.sum()), rng)
        points[base, 2] = -1.0
        return points
    if shape == "torus":
        major, minor = TORUS_MAJOR_RADIUS, TORUS_MINOR_RADIUS
        tube_angles = np.empty(0)
        while tube_angles.size < count:
            # The area element is proportional to (R + r cos(phi)): rejection-sample phi accordingly.
            proposal = rng.uniform(0, 2 * np.pi, 2 * count)
            keep = rng.random(2 * count) < (major + minor * np.cos(proposal)) / (major + minor)
            tube_angles = np.concatenate([tube_angles, proposal[keep]])
        tube_angles = tube_angles[:count]
        ring_angles = rng.uniform(0, 2 * np.pi, count)
        ring = major + minor * np.cos(tube_angles)
        return np.stack([ring * np.cos(ring_angles), ring * np.sin(ring_angles), minor * np.sin(tube_angles)], axis=1)
    if shape == "pyramid":
        points = np.empty((count, 3))
        on_base = rng.random(count) < 4 / (4 + 4 * math.sqrt(5))
        base = int(on_base.sum())
        points[on_base] = np.column_stack([rng.uniform(-1, 1, (base, 2)), -np.ones(base)])
        sides = count - base
        u, v = rng.random(sides), rng.random(sides)
        flip = u + v > 1
        u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
        # Face x = +1 side: base corners (1, -1, -1), (1, 1, -1), apex (0, 0, 1); the other faces are its rotations.
        corner_a, corner_b, apex = np.array([1.0, -1, -1]), np.array([1.0, 1, -1]), np.array([0.0, 0, 1])
        face_points = corner_a + u[:, None] * (corner_b - corner_a) + v[:, None] * (apex - corner_a)
        quarter = rng.integers(4, size=sides)
        angle = quarter * (np.pi / 2)
        cos, sin = np.rint(np.cos(angle)), np.rint(np.sin(angle))
        rotated = np.stack(
            [
                cos * face_points[:, 0] - sin * face_points[:, 1],
                sin * face_points[:, 0] + cos * face_points[:, 1],
                face_points[:, 2],
            ],
            axis=1,
        )
        points[~on_base] = rotated
        return points
    raise ValueError(f"unknown primitive {shape!r}; expected one of {POINT_CLOUD_SHAPES}.")


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    quaternion = rng.normal(size=4)
    w, x, y, z = quaternion / np.linalg.norm(quaternion)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _rgb_unit(color: str) -> np.ndarray:
    return np.asarray(COLOR_RGB[color], dtype=np.float64) / 255.0


_POINT_CLOUD_SCALES = {"small": (0.3, 0.5), "medium": (0.6, 0.8), "large": (0.9, 1.1)}


def point_cloud_features(num_points: int = 8192, with_color: bool = False) -> datasets.Features:
    """``datasets.Features`` of :func:`generate_point_clouds`."""
    return datasets.Features(
        {
            "sample_id": datasets.Value("string"),
            "points": datasets.Array2D(shape=(num_points, 6 if with_color else 3), dtype="float32"),
            "category": datasets.Value("string"),
            "color": datasets.Value("string"),
            "size": datasets.Value("string"),
            "caption": datasets.Value("string"),
            "scale": datasets.Value("float32"),
            "rotation": datasets.Array2D(shape=(3, 3), dtype="float32"),
        }
    )


def generate_point_clouds(
    num_samples: int,
    *,
    seed: int = 0,
    split: str = "train",
    num_points: int = 8192,
    with_color: bool = False,
) -> datasets.Dataset:
    """Generate single primitives sampled on their surface, with captions (RegionBLIP's P-text data, Cap3D-like).

    Args:
        num_samples: how many point clouds.
        seed, split: as in :func:`generate_scenes`.
        num_points: points per cloud (>= 64).
        with_color: append the primitive's RGB in [0, 1] to every point.

    Returns:
        A ``datasets.Dataset`` with :func:`point_cloud_features`. ``points`` is ``(num_points, 3)`` float32 xyz
        (``(num_points, 6)`` xyz + RGB with ``with_color``) equal to ``scale * canonical @ rotation.T``, where the
        canonical primitive (unit sphere, cube ``[-1, 1]^3``, ...) is centred on the origin; ``rotation`` is the
        ``(3, 3)`` matrix and ``scale`` the factor, so ``points @ rotation / scale`` recovers the canonical surface.
        ``caption`` is ``"a small red cone"`` (the colour only with ``with_color``).
    """
    num_samples = _check_count(num_samples, "num_samples")
    seed = _check_int(seed, "seed", 0)
    split = _check_split(split)
    num_points = _check_int(num_points, "num_points", 64)
    if not isinstance(with_color, bool):
        raise TypeError(f"`with_color` must be a bool; got {with_color!r}.")
    rows = []
    for index in range(num_samples):
        rng = _example_rng("point_clouds", seed, split, index)
        shape = POINT_CLOUD_SHAPES[int(rng.integers(len(POINT_CLOUD_SHAPES)))]
        color = COLORS[int(rng.integers(len(COLORS)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        scale = float(np.float32(rng.uniform(*_POINT_CLOUD_SCALES[size])))
        rotation = _random_rotation(rng).astype(np.float32).astype(np.float64)
        points = scale * _sample_surface(shape, num_points, rng) @ rotation.T
        if with_color:
            points = np.concatenate([points, np.broadcast_to(_rgb_unit(color), (num_points, 3))], axis=1)
        rows.append(
            {
                "sample_id": f"pointcloud-{split}-{seed}-{index:06d}",
                "points": points.astype(np.float32),
                "category": shape,
                "color": color,
                "size": size,
                "caption": f"a {size} {color} {shape}" if with_color else f"a {size} {shape}",
                "scale": scale,
                "rotation": rotation.astype(np.float32),
            }
        )
    return _to_dataset(
        rows, point_cloud_features(num_points, with_color), split, "Synthetic primitive point clouds (hf_regionmm)."
    )


# ---------------------------------------------------------------------------------------------------------------------
# 3D scenes: several primitives on a floor, ScanRefer-like
# ---------------------------------------------------------------------------------------------------------------------

_SCENE_3D_SCALES = {"small": (0.18, 0.26), "medium": (0.3, 0.38), "large": (0.42, 0.5)}
_FLOOR_HALF_SIDE = 2.0


def scene_3d_features(num_points: int = 8192, with_color: bool = False) -> datasets.Features:
    """``datasets.Features`` of :func:`generate_3d_scenes`."""
    strings = datasets.List(datasets.Value("string"))
    return datasets.Features(
        {
            "scene_id": datasets.Value("string"),
            "points": datasets.Array2D(shape=(num_points, 6 if with_color else 3), dtype="float32"),
            "point_labels": datasets.List(datasets.Value("int32"), length=num_points),
            "boxes_3d": datasets.List(datasets.List(datasets.Value("float32"), length=6)),
            "categories": strings,
            "colors": strings,
            "sizes": strings,
            "object_captions": strings,
            "referring_expressions": datasets.List(
                {
                    "text": datasets.Value("string"),
                    "object_index": datasets.Value("int32"),
                    "kind": datasets.Value("string"),
                }
            ),
            "caption": datasets.Value("string"),
        }
    )


def _allocate(total: int, weights: np.ndarray, minimum: int) -> np.ndarray:
    """Split ``total`` into integer parts proportional to ``weights``, each >= ``minimum`` (largest remainders)."""
    spare = total - minimum * weights.size
    shares = spare * weights / weights.sum()
    counts = np.floor(shares).astype(np.int64)
    leftovers = spare - int(counts.sum())
    counts[np.argsort(-(shares - counts), kind="stable")[:leftovers]] += 1
    return counts + minimum


def _make_scene_3d(
    rng: np.random.Generator,
    scene_id: str,
    num_points: int,
    min_objects: int,
    max_objects: int,
    with_color: bool,
    floor_fraction: float,
) -> dict:
    num_objects = int(rng.integers(min_objects, max_objects + 1))
    objects: list[dict] = []
    for _ in range(40 * max_objects):
        if len(objects) == num_objects:
            break
        shape = _sample_attribute(POINT_CLOUD_SHAPES, [o["shape"] for o in objects], 0.35, rng)
        color = _sample_attribute(COLORS, [o["color"] for o in objects], 0.3, rng)
        size = SIZES[int(rng.integers(len(SIZES)))]
        scale = rng.uniform(*_SCENE_3D_SCALES[size])
        yaw = rng.uniform(0, 2 * np.pi)
        # Cube and pyramid corners turn with the yaw; the other primitives are round about z.
        half_xy = scale * (abs(math.cos(yaw)) + abs(math.sin(yaw))) if shape in ("cube", "pyramid") else scale
        half_z = scale * _CANONICAL_HALF_HEIGHT.get(shape, 1.0)
        limit = _FLOOR_HALF_SIDE - 0.1 - half_xy
        center = np.array([rng.uniform(-limit, limit), rng.uniform(-limit, limit), half_z])
        lows, highs = center[:2] - half_xy - 0.05, center[:2] + half_xy + 0.05
        if any(np.all((lows < o["highs"]) & (highs > o["lows"])) for o in objects):
            continue
        objects.append(
            {
                "shape": shape,
                "color": color,
                "size": size,
                "scale": scale,
                "yaw": yaw,
                "center": center,
                "half": np.array([half_xy, half_xy, half_z]),
                "lows": lows,
                "highs": highs,
            }
        )

    if len(objects) < min_objects:
        raise RuntimeError(f"could not fit {min_objects} primitives on the floor; lower `min_objects`.")
    num_floor = int(round(floor_fraction * num_points))
    weights = np.array([_CANONICAL_AREAS[o["shape"]] * o["scale"] ** 2 for o in objects])
    counts = _allocate(num_points - num_floor, weights, 16)
    parts = [np.column_stack([rng.uniform(-_FLOOR_HALF_SIDE, _FLOOR_HALF_SIDE, (num_floor, 2)), np.zeros(num_floor)])]
    labels = [np.full(num_floor, -1, dtype=np.int32)]
    colors = [np.full((num_floor, 3), 0.6)]
    for k, (obj, count) in enumerate(zip(objects, counts)):
        cos, sin = math.cos(obj["yaw"]), math.sin(obj["yaw"])
        yaw_matrix = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
        parts.append(obj["scale"] * _sample_surface(obj["shape"], int(count), rng) @ yaw_matrix.T + obj["center"])
        labels.append(np.full(int(count), k, dtype=np.int32))
        colors.append(np.broadcast_to(_rgb_unit(obj["color"]), (int(count), 3)))
    order = rng.permutation(num_points)
    points = np.concatenate(parts)[order]
    if with_color:
        points = np.concatenate([points, np.concatenate(colors)[order]], axis=1)

    geometry = _Geometry(
        np.stack([o["center"][:2] - o["half"][:2] for o in objects]),
        np.stack([o["center"][:2] + o["half"][:2] for o in objects]),
    )
    if with_color:
        key_sets = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))
    else:
        key_sets = (("shape",), ("size", "shape"))
    described = ("size", "color", "shape") if with_color else ("size", "shape")
    expressions = _referring_expressions(
        objects, geometry, key_sets, _RELATIONS_3D, _ORDINAL_AXES_3D, (0.15, 0.15), rng
    )
    captions = [f"a {_describe(o, described)}" for o in objects]
    left_to_right = np.argsort(geometry.centers[:, 0], kind="stable")
    return {
        "scene_id": scene_id,
        "points": points.astype(np.float32),
        "point_labels": np.concatenate(labels)[order],
        "boxes_3d": [np.concatenate([o["center"], 2 * o["half"]]).astype(np.float32).tolist() for o in objects],
        "categories": [o["shape"] for o in objects],
        "colors": [o["color"] for o in objects],
        "sizes": [o["size"] for o in objects],
        "object_captions": captions,
        "referring_expressions": expressions,
        "caption": _SCENE_3D_CAPTION.format(objects=_join([captions[k] for k in left_to_right])),
    }


def generate_3d_scenes(
    num_scenes: int,
    *,
    seed: int = 0,
    split: str = "train",
    num_points: int = 8192,
    min_objects: int = 2,
    max_objects: int = 5,
    with_color: bool = False,
    floor_fraction: float = 0.25,
) -> datasets.Dataset:
    """Generate ScanRefer-like scenes: primitives resting on a floor, 3D boxes and referring expressions.

    Frame: z up, the floor is the square ``[-2, 2]^2`` at ``z = 0``; the viewer looks along +y, so "left of" means
    smaller x and "in front of" smaller y. Primitives turn only about z and never overlap in the xy plane.

    Args:
        num_scenes: how many scenes.
        seed, split: as in :func:`generate_scenes`.
        num_points: points per scene (>= 256), split between floor (``floor_fraction``) and objects (by area).
        min_objects, max_objects: primitives per scene (1 to 6).
        with_color: append RGB in [0, 1] to each point and use colours in the text.
        floor_fraction: share of points on the floor, in [0, 0.9].

    Returns:
        A ``datasets.Dataset`` with :func:`scene_3d_features`: ``points`` ``(num_points, 3 | 6)`` float32 in shuffled
        order, ``point_labels`` ``(num_points,)`` object index or -1 for the floor, ``boxes_3d`` ``(n, 6)`` float32
        axis-aligned ``center_x, center_y, center_z, size_x, size_y, size_z`` in scene units, per-object attributes and
        ``object_captions``, ``referring_expressions`` (``"the cube left of the sphere"``) and a scene ``caption``.
    """
    num_scenes = _check_count(num_scenes, "num_scenes")
    seed = _check_int(seed, "seed", 0)
    split = _check_split(split)
    num_points = _check_int(num_points, "num_points", 256)
    min_objects, max_objects = _check_object_range(min_objects, max_objects, 1, 6)
    if not isinstance(with_color, bool):
        raise TypeError(f"`with_color` must be a bool; got {with_color!r}.")
    if not isinstance(floor_fraction, (int, float)) or not 0.0 <= float(floor_fraction) <= 0.9:
        raise ValueError(f"`floor_fraction` must be a float in [0, 0.9]; got {floor_fraction!r}.")
    rows = [
        _make_scene_3d(
            _example_rng("scenes_3d", seed, split, index),
            f"scene3d-{split}-{seed}-{index:06d}",
            num_points,
            min_objects,
            max_objects,
            with_color,
            float(floor_fraction),
        )
        for index in range(num_scenes)
    ]
    return _to_dataset(
        rows, scene_3d_features(num_points, with_color), split, "Synthetic ScanRefer-like 3D scenes (hf_regionmm)."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Convenience: all splits at once
# ---------------------------------------------------------------------------------------------------------------------

_GENERATORS: dict[str, Callable[..., datasets.Dataset]] = {
    "scenes": generate_scenes,
    "videos": generate_videos,
    "point_clouds": generate_point_clouds,
    "scenes_3d": generate_3d_scenes,
}


def load_synthetic(
    kind: str = "scenes",
    *,
    num_examples: int | Mapping[str, int] | None = None,
    seed: int = 0,
    **kwargs,
) -> datasets.DatasetDict:
    """All three splits of one synthetic data set as a ``datasets.DatasetDict``.

    Args:
        kind: ``"scenes"``, ``"videos"``, ``"point_clouds"`` or ``"scenes_3d"``.
        num_examples: examples per split: one int for every split, or a mapping ``{split: count}`` naming any of
            ``"train"``, ``"validation"``, ``"test"``. Default: 512 / 64 / 64.
        seed: as in :func:`generate_scenes`.
        **kwargs: passed to the generator (``image_size_range``, ``num_points``, ...).
    """
    if kind not in _GENERATORS:
        raise ValueError(f"`kind` must be one of {sorted(_GENERATORS)}; got {kind!r}.")
    if num_examples is None:
        num_examples = {"train": 512, "validation": 64, "test": 64}
    elif not isinstance(num_examples, Mapping):
        num_examples = dict.fromkeys(_SPLIT_CODES, num_examples)
    for split in num_examples:
        _check_split(split)
    return datasets.DatasetDict(
        {split: _GENERATORS[kind](count, seed=seed, split=split, **kwargs) for split, count in num_examples.items()}
    )
