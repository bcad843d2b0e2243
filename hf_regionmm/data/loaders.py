"""Readers for the public region data sets on local disk, in the synthetic data's schemas (data issue, item 2).

The four papers train and evaluate on RefCOCO/+/g, COCO, Visual Genome and Flickr30k Entities (Groma §4, u-LLaVA §3.3,
TAP-v2 §3.1, RegionBLIP's I-region data) and on ScanRefer and Cap3D/Objaverse (RegionBLIP §3, P-text and P-region-text
data). Each loader here reads one of them in its public file format and returns a ``datasets.Dataset`` whose columns
are those of the matching synthetic generator, so a model, collator or metric written against the synthetic data runs
unchanged on the real data:

=============================== ======================= ============================================================
loader                          schema                  columns it fills (every other shared column is empty)
=============================== ======================= ============================================================
:func:`load_refcoco`            :func:`scene_features`  boxes, masks, categories, region_captions (first sentence of
                                                        a referred object, ``""`` for the others),
                                                        referring_expressions (every sentence, ``kind`` = the data
                                                        set name)
:func:`load_coco_detection`     :func:`scene_features`  boxes, masks, categories
:func:`load_visual_genome_      :func:`scene_features`  boxes, region_captions (the region phrases); no ``masks``
regions`                        without masks           column
:func:`load_flickr30k_entities` :func:`scene_features`  one row per sentence: boxes (those its phrases ground, in
                                without masks           order of first mention), categories (entity type),
                                                        region_captions (the first phrase of each box),
                                                        referring_expressions (phrases grounded to exactly one box,
                                                        ``kind="phrase"``), image_caption, grounded_caption
:func:`load_scanrefer`          :func:`scene_3d_        points, point_labels (``-1`` unless an ``_ins_label.npy``
                                features`               file is present), boxes_3d, categories, object_captions
                                                        (first description of a referred object, ``""`` for the
                                                        others), referring_expressions (``kind="scanrefer"``)
:func:`load_cap3d`              :func:`point_cloud_     points, caption; ``scale`` 1 and identity ``rotation`` (the
                                features`               points are in the file's own frame)
=============================== ======================= ============================================================

"Empty" means ``[]`` for a per-object list the data set does not annotate at all (``colors``, ``sizes``,
``concept_targets``), ``""`` for a string, ``[]`` for ``vqa`` / chats / instructions and ``-1`` for ``salient_index``.
A per-object list the data set annotates for only some objects is padded with ``""`` so it stays aligned with
``boxes``. Every 2D loader adds an ``object_ids`` column (the source id of each box, as a string: COCO annotation id,
VG region id, Flickr30k phrase ids joined by ``/``); the COCO-based loaders add ``is_crowd``; :func:`load_scanrefer`
adds ``object_ids`` (ScanNet object ids). Drop them with ``remove_columns`` before concatenating with synthetic data.

Conventions, as in :mod:`hf_regionmm.data.synthetic`:

* Image boxes are **absolute pixel xyxy float32**, pixel-edge convention (a box whose pixels run from column ``c0``
  to ``c1`` inclusive has ``x1 = c0`` and ``x2 = c1 + 1``). COCO and Visual Genome ``x, y, width, height`` become
  ``[x, y, x + width, y + height]``; the 1-based inclusive PASCAL-VOC boxes of Flickr30k Entities become
  ``[xmin - 1, ymin - 1, xmax, ymax]``. Boxes overhanging the image by at most one pixel (float rounding in the
  public files) are clipped; larger overhangs are malformed records.
* Masks are COCO uncompressed RLE counts, column-major (:func:`~hf_regionmm.data.synthetic.encode_rle`). COCO
  polygons are rasterised here with numpy (:func:`polygons_to_mask`: a pixel is inside when its centre is, even-odd
  rule), compressed RLE strings are decoded here (:func:`decode_coco_rle_string`); ``pycocotools`` is not needed.
  Along polygon edges the result may differ from ``pycocotools`` by a pixel.
* 3D boxes are ``center_x, center_y, center_z, size_x, size_y, size_z`` in the scene's own frame (ScanRefer's
  preprocessed ``aligned_bbox`` layout already is). Point colours stored in ``0..255`` are divided by 255 so colour
  columns are always in ``[0, 1]``.
* Point clouds with more points than ``num_points`` are randomly subsampled without replacement, those with fewer are
  sampled with replacement (RegionBLIP samples scenes randomly too). The draw depends only on ``seed`` and the record
  id, so the same files give the same data set.

Malformed records (missing keys, boxes outside the image or with zero area, missing image or point files, unreadable
arrays) are skipped and listed with their record id in one :class:`MalformedRecordWarning` per call; with
``strict=True`` the first one raises a ``ValueError`` naming the record and the problem instead. Files are never
unpickled with plain ``pickle.load``: RefCOCO refs pickles go through :class:`RestrictedUnpickler`, and numpy arrays
are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import builtins
import csv
import json
import math
import os
import pickle
import re
import warnings
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse
from xml.etree import ElementTree

import datasets
import numpy as np
from PIL import Image

from .synthetic import decode_rle, encode_rle, point_cloud_features, scene_3d_features, scene_features

__all__ = [
    "REFER_DATASETS",
    "Flickr30kPhrase",
    "MalformedRecordWarning",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "coco_segmentation_to_rle",
    "coco_xywh_to_xyxy",
    "decode_coco_rle_string",
    "encode_coco_rle_string",
    "flickr30k_grounded_caption",
    "load_cap3d",
    "load_coco_detection",
    "load_flickr30k_entities",
    "load_refcoco",
    "load_refs",
    "load_scanrefer",
    "load_visual_genome_regions",
    "parse_flickr30k_sentence",
    "polygons_to_mask",
]

PathLike = str | os.PathLike

REFER_DATASETS: tuple[str, ...] = ("refcoco", "refcoco+", "refcocog", "refclef")
"""Data sets of the ``refer`` toolkit whose ``refs(*).p`` + ``instances.json`` :func:`load_refcoco` reads."""

# Public files round box corners; an overhang up to this many pixels is clipped rather than reported.
_BOX_TOLERANCE = 1.0
_MAX_LISTED_PROBLEMS = 20

# NYU40 class names indexed by the label column of ScanRefer's ``*_aligned_bbox.npy`` (1-based; 0 is unannotated).
_NYU40_CLASSES: tuple[str, ...] = (
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "blinds",
    "desk",
    "shelves",
    "curtain",
    "dresser",
    "pillow",
    "mirror",
    "floor mat",
    "clothes",
    "ceiling",
    "books",
    "refrigerator",
    "television",
    "paper",
    "towel",
    "shower curtain",
    "box",
    "whiteboard",
    "person",
    "night stand",
    "toilet",
    "sink",
    "lamp",
    "bathtub",
    "bag",
    "otherstructure",
    "otherfurniture",
    "otherprop",
)

# ---------------------------------------------------------------------------------------------------------------------
# Arguments, files and malformed-record reports
# ---------------------------------------------------------------------------------------------------------------------


class MalformedRecordWarning(UserWarning):
    """Emitted once per loader call; its message lists every skipped record id and why it was skipped."""


class _Problems:
    """Collects malformed records of one loader call: raise at the first one (``strict``) or warn once at the end."""

    def __init__(self, loader: str, strict: bool) -> None:
        if not isinstance(strict, bool):
            raise TypeError(f"`strict` must be a bool; got {strict!r}.")
        self.loader = loader
        self.strict = strict
        self.records: list[tuple[str, str]] = []

    def add(self, record: str, problem: str) -> None:
        if self.strict:
            raise ValueError(
                f"{self.loader}: {record}: {problem}. Fix or remove that record, or pass `strict=False` to skip "
                "malformed records with a warning."
            )
        self.records.append((record, problem))

    def warn(self) -> None:
        if not self.records:
            return
        listed = "; ".join(f"{record}: {problem}" for record, problem in self.records[:_MAX_LISTED_PROBLEMS])
        more = len(self.records) - _MAX_LISTED_PROBLEMS
        if more > 0:
            listed += f"; ... and {more} more"
        warnings.warn(
            f"{self.loader} skipped {len(self.records)} malformed record(s): {listed}. "
            "Pass `strict=True` to raise at the first one instead.",
            MalformedRecordWarning,
            stacklevel=3,
        )


def _as_path(value: object, name: str) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a path (str or os.PathLike); got {type(value).__name__} {value!r}.")
    return Path(value)


def _existing_file(value: object, name: str, what: str) -> Path:
    path = _as_path(value, name)
    if not path.is_file():
        raise FileNotFoundError(f"`{name}` must be {what}; {str(path)!r} is not a file.")
    return path


def _existing_dir(value: object, name: str, what: str) -> Path:
    path = _as_path(value, name)
    if not path.is_dir():
        raise FileNotFoundError(f"`{name}` must be {what}; {str(path)!r} is not a directory.")
    return path


def _optional_count(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"`{name}` must be None or a non-negative int; got {value!r}.")
    return int(value)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive int; got {value!r}.")
    return int(value)


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool; got {value!r}.")
    return value


def _read_json(path: Path, name: str) -> object:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"`{name}` ({path}) is not valid UTF-8 JSON: {error}.") from None


def _json_list(path: Path, name: str, what: str) -> list:
    data = _read_json(path, name)
    if not isinstance(data, list):
        raise ValueError(f"`{name}` ({path}) must hold a JSON list of {what}; got a {type(data).__name__}.")
    return data


def _missing_keys(record: Mapping, keys: Sequence[str]) -> str:
    missing = [key for key in keys if key not in record]
    return f"missing key(s) {missing}" if missing else ""


def _id_key(value: object) -> tuple:
    """Sort key ordering integer ids numerically and any other ids after them as strings."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (0, int(value), "")
    return (1, 0, str(value))


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def _dataset(rows: list[dict], features: datasets.Features, description: str, split: str | None) -> datasets.Dataset:
    info = datasets.DatasetInfo(description=description, features=features)
    if not rows:
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features, info=info, split=split)
    return datasets.Dataset.from_list(rows, features=features, info=info, split=split)


# ---------------------------------------------------------------------------------------------------------------------
# Refs pickles: a restricted unpickler
# ---------------------------------------------------------------------------------------------------------------------

# Everything a refs list can hold. Calling any of these with pickled arguments only builds plain data.
_SAFE_BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int", "float", "bool"})


class UnsafePickleError(ValueError, pickle.UnpicklingError):
    """A pickle asked for a class or function that :class:`RestrictedUnpickler` does not allow."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds plain data only: dicts, lists, tuples, sets, strings, bytes, numbers and booleans.

    Pickles of such data (the public ``refs(unc).p`` / ``refs(umd).p`` / ``refs(google).p`` files, written by
    Python 2) never name a global, so ``find_class`` is reached only by pickles that would import or call something,
    e.g. ``os.system``; those raise :class:`UnsafePickleError` before anything runs. Python 2 ``str`` objects are
    decoded as UTF-8 (undecodable bytes become U+FFFD).
    """

    def __init__(self, file) -> None:
        super().__init__(file, encoding="utf-8", errors="replace")

    def find_class(self, module: str, name: str) -> type:
        # Python 2 pickles name the builtins module `__builtin__`; overriding find_class skips pickle's own renaming.
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        raise UnsafePickleError(
            f"refusing to unpickle `{module}.{name}`: a refs file holds only plain dicts, lists, strings and numbers, "
            "so this pickle is not a refs file (or was tampered with). Use the public refs pickle or the same list "
            "saved as JSON."
        )


def load_refs(refs_path: PathLike) -> list[dict]:
    """Read a ``refer``-toolkit refs list from its public pickle (``refs(unc).p``) or from the same list as JSON.

    The format is detected from the content (JSON starts with ``[``), and pickles are read with
    :class:`RestrictedUnpickler`, never with ``pickle.load``.

    Returns:
        The list of ref dicts as stored (``ref_id``, ``ann_id``, ``image_id``, ``split``, ``sentences``, ...).

    Raises:
        UnsafePickleError: (a ``ValueError``) the pickle names any global, e.g. ``os.system``.
        ValueError: the file is neither a refs pickle nor JSON, or does not hold a list.
    """
    path = _existing_file(refs_path, "refs_path", "the refs file (refs(unc).p, refs(umd).p or its JSON)")
    with open(path, "rb") as handle:
        head = handle.read(64).lstrip()
        handle.seek(0)
        if head[:1] in (b"[", b"{") or path.suffix.lower() == ".json":
            refs = _read_json(path, "refs_path")
        else:
            try:
                refs = RestrictedUnpickler(handle).load()
            except UnsafePickleError:
                raise
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as error:
                raise ValueError(
                    f"`refs_path` ({path}) is neither a refs pickle nor JSON ({type(error).__name__}: {error})."
                ) from None
    if not isinstance(refs, list):
        raise ValueError(f"`refs_path` ({path}) must hold a list of refs; got a {type(refs).__name__}.")
    return refs


# ---------------------------------------------------------------------------------------------------------------------
# COCO geometry: boxes, polygons, RLE
# ---------------------------------------------------------------------------------------------------------------------


def coco_xywh_to_xyxy(boxes: Sequence[float] | np.ndarray) -> np.ndarray:
    """COCO ``[x, y, width, height]`` boxes to ``[x1, y1, x2, y2]``, both absolute pixels.

    Args:
        boxes: ``(4,)`` or ``(n, 4)`` numbers, absolute pixel xywh (top-left corner, extent).

    Returns:
        float64 array of the input's shape, absolute pixel xyxy. No validation: see the loaders for that.
    """
    array = np.asarray(boxes, dtype=np.float64)
    if array.shape[-1:] != (4,) or array.ndim > 2:
        raise ValueError(f"`boxes` must have shape (4,) or (n, 4) (COCO x, y, width, height); got {array.shape}.")
    return np.concatenate([array[..., :2], array[..., :2] + array[..., 2:]], axis=-1)


def _fill_polygon(vertices: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixels of a ``(height, width)`` grid whose centres lie inside one polygon (even-odd rule)."""
    mask = np.zeros((height, width), dtype=bool)
    x_start, y_start = vertices[:, 0], vertices[:, 1]
    x_end, y_end = np.roll(x_start, -1), np.roll(y_start, -1)
    row_low = max(int(math.floor(y_start.min())) - 1, 0)
    row_high = min(int(math.ceil(y_start.max())) + 1, height)
    if row_low >= row_high:
        return mask
    centers = np.arange(row_low, row_high, dtype=np.float64)[:, None] + 0.5
    # Half-open in y, so a vertex shared by two edges is crossed once and horizontal edges never.
    crosses = ((y_start <= centers) & (centers < y_end)) | ((y_end <= centers) & (centers < y_start))
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing_x = x_start + (centers - y_start) * (x_end - x_start) / (y_end - y_start)
    crossing_x = np.sort(np.where(crosses, crossing_x, np.inf), axis=1)
    if crossing_x.shape[1] % 2:
        crossing_x = np.concatenate([crossing_x, np.full((crossing_x.shape[0], 1), np.inf)], axis=1)
    enter, leave = crossing_x[:, 0::2], crossing_x[:, 1::2]
    inside = np.isfinite(leave)
    # Pixel c is covered when its centre c + 0.5 lies in [enter, leave).
    first = np.clip(np.ceil(enter[inside] - 0.5), 0, width).astype(np.int64)
    stop = np.clip(np.ceil(leave[inside] - 0.5), 0, width).astype(np.int64)
    rows = np.broadcast_to(np.arange(row_high - row_low)[:, None], enter.shape)[inside]
    edges = np.zeros((row_high - row_low, width + 1), dtype=np.int32)
    np.add.at(edges, (rows, first), 1)
    np.add.at(edges, (rows, stop), -1)
    mask[row_low:row_high] = np.cumsum(edges[:, :width], axis=1) > 0
    return mask


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons: the union of the pixels whose centres lie inside each polygon.

    Args:
        polygons: COCO ``segmentation`` polygons, each a flat ``[x0, y0, x1, y1, ...]`` list of at least three
            vertices in absolute pixel coordinates (pixel ``(r, c)`` spans ``[c, c + 1] x [r, r + 1]``).
        height, width: the image size in pixels.

    Returns:
        ``(height, width)`` bool mask. The polygon ``[2, 1, 6, 1, 6, 4, 2, 4]`` covers columns 2-5 of rows 1-3.
    """
    height, width = _positive_int(height, "height"), _positive_int(width, "width")
    if isinstance(polygons, (str, bytes, Mapping)) or not isinstance(polygons, Sequence):
        raise TypeError(
            f"`polygons` must be a list of flat [x0, y0, x1, y1, ...] lists; got {type(polygons).__name__}."
        )
    mask = np.zeros((height, width), dtype=bool)
    for index, polygon in enumerate(polygons):
        try:
            coordinates = np.asarray(polygon, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"`polygons[{index}]` must be a flat list of numbers; got {polygon!r}.") from None
        if coordinates.ndim != 1 or coordinates.size < 6 or coordinates.size % 2:
            raise ValueError(
                f"`polygons[{index}]` must be a flat [x0, y0, x1, y1, ...] list of at least 3 vertices; got "
                f"{coordinates.size} numbers with shape {coordinates.shape}."
            )
        if not np.isfinite(coordinates).all():
            raise ValueError(f"`polygons[{index}]` has non-finite coordinates.")
        mask |= _fill_polygon(coordinates.reshape(-1, 2), height, width)
    return mask


def decode_coco_rle_string(counts: str) -> list[int]:
    """Decode the compressed counts string of COCO RLE (``{"size": [h, w], "counts": "..."}``) to run lengths.

    The string is the ``pycocotools`` encoding: each run is a sequence of 6-bit chunks (character ``- 48``), 5 value
    bits plus a continuation bit, sign-extended from the last chunk; from the fourth run on, the value is a
    difference to the run two places earlier.

    Returns:
        Uncompressed counts as in :func:`~hf_regionmm.data.synthetic.encode_rle` (column-major, background first).
    """
    if not isinstance(counts, str):
        raise TypeError(f"`counts` must be a str (compressed COCO RLE); got {type(counts).__name__}.")
    data = counts.encode("ascii", errors="replace")
    runs: list[int] = []
    position = 0
    while position < len(data):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(data):
                raise ValueError("`counts` ends in the middle of a run; the compressed RLE string is truncated.")
            chunk = data[position] - 48
            if not 0 <= chunk < 64:
                raise ValueError(f"`counts` has character {chr(data[position])!r} outside the COCO RLE alphabet.")
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            position += 1
            shift += 5
            if not more and chunk & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError(f"`counts` decodes to a negative run length ({value}) at run {len(runs)}.")
        runs.append(value)
    return runs


def encode_coco_rle_string(counts: Sequence[int]) -> str:
    """Inverse of :func:`decode_coco_rle_string`: uncompressed RLE counts to the compressed COCO counts string."""
    runs = [int(run) for run in counts]
    if any(run < 0 for run in runs):
        raise ValueError("`counts` must be non-negative run lengths.")
    characters = []
    for index, run in enumerate(runs):
        value = run - runs[index - 2] if index > 2 else run
        more = True
        while more:
            chunk = value & 0x1F
            value >>= 5
            more = value != -1 if chunk & 0x10 else value != 0
            characters.append(chr((chunk | 0x20 if more else chunk) + 48))
    return "".join(characters)


def coco_segmentation_to_rle(segmentation: object, height: int, width: int) -> list[int]:
    """Any COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as uncompressed column-major RLE counts.

    Args:
        segmentation: a list of polygons (see :func:`polygons_to_mask`) or ``{"size": [height, width], "counts":
            list | str}``.
        height, width: the image size in pixels; an RLE must have been encoded for this size.

    Returns:
        Counts as :func:`~hf_regionmm.data.synthetic.encode_rle` writes them (normalised: no empty inner runs).
    """
    height, width = _positive_int(height, "height"), _positive_int(width, "width")
    if isinstance(segmentation, Mapping):
        if "counts" not in segmentation or "size" not in segmentation:
            raise ValueError("an RLE `segmentation` needs 'size' and 'counts'.")
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"RLE size {size} does not match the {height}x{width} (height x width) image.")
        counts = segmentation["counts"]
        if isinstance(counts, str):
            counts = decode_coco_rle_string(counts)
        mask = decode_rle(counts, height, width)
    elif isinstance(segmentation, Sequence) and not isinstance(segmentation, (str, bytes)):
        mask = polygons_to_mask(segmentation, height, width)
    else:
        raise ValueError(f"`segmentation` must be COCO polygons or an RLE dict; got {type(segmentation).__name__}.")
    return encode_rle(mask)


def _image_box(box_xyxy: Sequence[float], width: int, height: int) -> tuple[list[float] | None, str]:
    """``(box, "")`` with the xyxy box clipped into the image, or ``(None, why)`` when it is malformed."""
    try:
        box = [float(v) for v in box_xyxy]
    except (TypeError, ValueError):
        return None, f"box {box_xyxy!r} is not 4 numbers"
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        return None, f"box {box_xyxy!r} is not 4 finite numbers"
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return None, f"box {_fmt(box)} (xyxy) has zero area"
    if x1 < -_BOX_TOLERANCE or y1 < -_BOX_TOLERANCE or x2 > width + _BOX_TOLERANCE or y2 > height + _BOX_TOLERANCE:
        return None, f"box {_fmt(box)} (xyxy) lies outside the {width}x{height} image"
    clipped = [max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None, f"box {_fmt(box)} (xyxy) covers no pixel of the {width}x{height} image"
    return clipped, ""


# ---------------------------------------------------------------------------------------------------------------------
# 2D scene rows
# ---------------------------------------------------------------------------------------------------------------------


def _scene_features(with_masks: bool, with_crowd: bool) -> datasets.Features:
    features = dict(scene_features(with_masks))
    features["object_ids"] = datasets.List(datasets.Value("string"))
    if with_crowd:
        features["is_crowd"] = datasets.List(datasets.Value("bool"))
    return datasets.Features(features)


def _scene_row(image_path: Path, scene_id: str, width: int, height: int, **filled: object) -> dict:
    """A :func:`scene_features` row with every column the caller does not fill empty."""
    row = {
        "image": {"path": str(image_path), "bytes": None},
        "scene_id": scene_id,
        "width": width,
        "height": height,
        "boxes": [],
        "categories": [],
        "colors": [],
        "sizes": [],
        "concept_targets": [],
        "region_captions": [],
        "referring_expressions": [],
        "image_caption": "",
        "vqa": [],
        "grounded_caption": "",
        "grounded_chat": [],
        "multi_grounding": [],
        "ullava_instructions": [],
        "salient_index": -1,
        "object_ids": [],
    }
    unknown = set(filled) - set(row) - {"masks", "is_crowd"}
    if unknown:
        raise KeyError(f"not a scene column: {sorted(unknown)}")
    row.update(filled)
    return row


# ---------------------------------------------------------------------------------------------------------------------
# COCO detection and RefCOCO/+/g
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _CocoIndex:
    images: list
    annotations_by_image: dict[object, list[dict]]
    category_names: dict[object, str]


def _read_coco(path: Path, name: str, problems: _Problems) -> _CocoIndex:
    data = _read_json(path, name)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise ValueError(
            f"`{name}` ({path}) must be a COCO instances JSON: an object with 'images', 'annotations' and "
            "'categories' lists."
        )
    category_names = {}
    for position, category in enumerate(data.get("categories") or []):
        if isinstance(category, Mapping) and "id" in category and "name" in category:
            category_names[category["id"]] = str(category["name"])
        else:
            problems.add(f"category at position {position}", "needs 'id' and 'name'")
    annotations_by_image: dict[object, list[dict]] = {}
    for position, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, Mapping) or "image_id" not in annotation:
            record = annotation.get("id", f"at position {position}") if isinstance(annotation, Mapping) else position
            problems.add(f"annotation {record}", "has no 'image_id'")
            continue
        annotations_by_image.setdefault(annotation["image_id"], []).append(annotation)
    return _CocoIndex(data["images"], annotations_by_image, category_names)


def _coco_image(image: object, position: int, images_dir: Path, problems: _Problems) -> tuple | None:
    """``(image_id, path, width, height)`` of a COCO ``images`` entry whose file exists, else ``None`` (reported)."""
    if not isinstance(image, Mapping) or "id" not in image:
        problems.add(f"image at position {position}", "has no 'id'")
        return None
    image_id = image["id"]
    missing = _missing_keys(image, ("file_name", "width", "height"))
    if missing:
        problems.add(f"image {image_id}", missing)
        return None
    try:
        width, height = int(image["width"]), int(image["height"])
    except (TypeError, ValueError):
        width = height = 0
    if width <= 0 or height <= 0:
        problems.add(f"image {image_id}", f"size {image['width']!r}x{image['height']!r} is not positive integers")
        return None
    path = images_dir / str(image["file_name"])
    if not path.is_file():
        problems.add(f"image {image_id}", f"image file not found at {path}")
        return None
    return image_id, path, width, height


def _coco_objects(
    image_id: object,
    annotations: list[dict],
    category_names: Mapping,
    width: int,
    height: int,
    *,
    with_masks: bool,
    include_crowd: bool,
    problems: _Problems,
) -> list[dict]:
    """Valid objects of one image in annotation order: ``{id, box, mask, category, crowd}``; bad ones reported."""
    required = ("id", "bbox", "category_id", "segmentation") if with_masks else ("id", "bbox", "category_id")
    objects = []
    for annotation in annotations:
        record = f"annotation {annotation.get('id', '?')} (image {image_id})"
        crowd = bool(annotation.get("iscrowd", 0))
        if crowd and not include_crowd:
            continue
        missing = _missing_keys(annotation, required)
        if missing:
            problems.add(record, missing)
            continue
        bbox = annotation["bbox"]
        if not isinstance(bbox, Sequence) or isinstance(bbox, str) or len(bbox) != 4:
            problems.add(record, f"'bbox' must be COCO [x, y, width, height]; got {bbox!r}")
            continue
        try:
            corners = coco_xywh_to_xyxy(bbox).tolist()
        except (TypeError, ValueError):
            problems.add(record, f"'bbox' must be 4 numbers; got {bbox!r}")
            continue
        box, why = _image_box(corners, width, height)
        if box is None:
            problems.add(record, why)
            continue
        if annotation["category_id"] not in category_names:
            problems.add(record, f"category_id {annotation['category_id']!r} is not in 'categories'")
            continue
        mask = None
        if with_masks:
            try:
                mask = coco_segmentation_to_rle(annotation["segmentation"], height, width)
            except (TypeError, ValueError) as error:
                problems.add(record, f"bad 'segmentation': {error}")
                continue
        objects.append(
            {
                "id": str(annotation["id"]),
                "box": box,
                "mask": mask,
                "category": category_names[annotation["category_id"]],
                "crowd": crowd,
            }
        )
    return objects


def _coco_scene_row(
    image_id: object, path: Path, width: int, height: int, objects: list[dict], prefix: str, with_masks: bool, **filled
) -> dict:
    row = _scene_row(
        path,
        f"{prefix}/{image_id}",
        width,
        height,
        boxes=[o["box"] for o in objects],
        categories=[o["category"] for o in objects],
        object_ids=[o["id"] for o in objects],
        is_crowd=[o["crowd"] for o in objects],
        **filled,
    )
    if with_masks:
        row["masks"] = [o["mask"] for o in objects]
    return row


def load_coco_detection(
    instances_path: PathLike,
    images_dir: PathLike,
    *,
    max_images: int | None = None,
    with_masks: bool = True,
    include_crowd: bool = False,
    strict: bool = False,
) -> datasets.Dataset:
    """Read a COCO detection / instance segmentation split (``instances_val2017.json`` + its image folder).

    Args:
        instances_path: COCO instances JSON (``images``, ``annotations`` with ``bbox`` in pixel xywh and
            ``segmentation`` polygons or RLE, ``categories``).
        images_dir: folder holding each image's ``file_name``.
        max_images: stop after this many images (in the JSON's order); ``None`` reads all.
        with_masks: rasterise ``segmentation`` into the ``masks`` column.
        include_crowd: keep ``iscrowd`` objects (flagged ``True`` in ``is_crowd``); by default they are skipped,
            as COCO detection training and evaluation ignore them.
        strict: raise at the first malformed record instead of skipping it with a :class:`MalformedRecordWarning`.

    Returns:
        One row per image (images without objects included) with :func:`scene_features` columns plus
        ``object_ids`` (annotation ids) and ``is_crowd``. ``scene_id`` is ``"coco/<image_id>"``, ``boxes``
        ``(n, 4)`` float32 absolute pixel xyxy, ``masks`` RLE counts, ``categories`` the category names.
    """
    instances = _existing_file(instances_path, "instances_path", "a COCO instances JSON")
    images_root = _existing_dir(images_dir, "images_dir", "the folder of the COCO images")
    max_images = _optional_count(max_images, "max_images")
    with_masks, include_crowd = _flag(with_masks, "with_masks"), _flag(include_crowd, "include_crowd")
    problems = _Problems("load_coco_detection", strict)
    coco = _read_coco(instances, "instances_path", problems)
    rows = []
    for position, image in enumerate(coco.images):
        if max_images is not None and len(rows) >= max_images:
            break
        entry = _coco_image(image, position, images_root, problems)
        if entry is None:
            continue
        image_id, path, width, height = entry
        objects = _coco_objects(
            image_id,
            coco.annotations_by_image.get(image_id, []),
            coco.category_names,
            width,
            height,
            with_masks=with_masks,
            include_crowd=include_crowd,
            problems=problems,
        )
        rows.append(_coco_scene_row(image_id, path, width, height, objects, "coco", with_masks))
    problems.warn()
    return _dataset(rows, _scene_features(with_masks, True), f"COCO detection from {instances.name}.", None)


def _ref_sentences(ref: Mapping) -> list[str] | None:
    sentences = ref["sentences"]
    if not isinstance(sentences, Sequence) or isinstance(sentences, str):
        return None
    texts = []
    for sentence in sentences:
        if not isinstance(sentence, Mapping):
            return None
        text = sentence.get("sent", sentence.get("raw"))
        if not isinstance(text, str):
            return None
        if text.strip():
            texts.append(text.strip())
    return texts


def load_refcoco(
    refs_path: PathLike,
    instances_path: PathLike,
    images_dir: PathLike,
    *,
    split: str = "val",
    dataset: str = "refcoco",
    with_masks: bool = True,
    strict: bool = False,
) -> datasets.Dataset:
    """Read one split of RefCOCO, RefCOCO+, RefCOCOg or RefCLEF in the ``refer`` toolkit's public format.

    Args:
        refs_path: ``refs(unc).p`` / ``refs(umd).p`` / ``refs(google).p`` (read with :class:`RestrictedUnpickler`)
            or the same list as JSON: dicts with ``ref_id``, ``ann_id``, ``image_id``, ``split`` and ``sentences``
            (``[{sent, raw, tokens, sent_id}]``).
        instances_path: the data set's ``instances.json`` (COCO format; boxes in pixel xywh, polygon masks).
        images_dir: folder of the images named by ``instances.json`` (COCO ``train2014`` for RefCOCO/+/g).
        split: the refs' split to read, e.g. ``"val"``, ``"testA"``, ``"testB"`` (unc) or ``"test"`` (umd).
        dataset: one of :data:`REFER_DATASETS`; names ``scene_id`` and the expressions' ``kind``.
        with_masks: rasterise the annotations' segmentation into ``masks`` (u-LLaVA's RES targets).
        strict: raise at the first malformed record instead of skipping it with a :class:`MalformedRecordWarning`.

    Returns:
        One row per image of the split, sorted by image id, with :func:`scene_features` columns plus
        ``object_ids`` and ``is_crowd``. ``boxes`` holds **every** annotation of the image (distractors too; crowd
        annotations flagged), absolute pixel xyxy float32; each sentence of each ref of the split becomes one
        ``referring_expressions`` entry ``{text: sent, object_index: index of its ann_id in boxes, kind: dataset}``;
        ``region_captions`` holds the first sentence of each referred object and ``""`` for the others.
    """
    if dataset not in REFER_DATASETS:
        raise ValueError(f"`dataset` must be one of {REFER_DATASETS}; got {dataset!r}.")
    if not isinstance(split, str):
        raise TypeError(f"`split` must be a str such as 'val'; got {split!r}.")
    refs = load_refs(refs_path)
    instances = _existing_file(instances_path, "instances_path", "the refer data set's instances.json")
    images_root = _existing_dir(images_dir, "images_dir", "the folder of the images named in instances.json")
    with_masks = _flag(with_masks, "with_masks")
    problems = _Problems("load_refcoco", strict)

    splits = sorted({ref["split"] for ref in refs if isinstance(ref, Mapping) and isinstance(ref.get("split"), str)})
    if split not in splits:
        raise ValueError(f"`split` {split!r} does not occur in `refs_path`; its refs have splits {splits}.")
    refs_by_image: dict[object, list[Mapping]] = {}
    for position, ref in enumerate(refs):
        if not isinstance(ref, Mapping):
            problems.add(f"ref at position {position}", "is not a dict")
            continue
        record = f"ref {ref.get('ref_id', f'at position {position}')}"
        missing = _missing_keys(ref, ("ref_id", "ann_id", "image_id", "split", "sentences"))
        if missing:
            problems.add(record, missing)
            continue
        if ref["split"] == split:
            refs_by_image.setdefault(ref["image_id"], []).append(ref)

    coco = _read_coco(instances, "instances_path", problems)
    images = {image["id"]: (p, image) for p, image in enumerate(coco.images) if isinstance(image, Mapping)}
    rows = []
    for image_id in sorted(refs_by_image, key=_id_key):
        image_refs = sorted(refs_by_image[image_id], key=lambda ref: _id_key(ref["ref_id"]))
        if image_id not in images:
            problems.add(f"image {image_id}", f"is not in `instances_path` (refs {[r['ref_id'] for r in image_refs]})")
            continue
        entry = _coco_image(images[image_id][1], images[image_id][0], images_root, problems)
        if entry is None:
            continue
        _, path, width, height = entry
        # Keep crowd annotations: a ref may point at one, and its flag says how to treat it.
        objects = _coco_objects(
            image_id,
            coco.annotations_by_image.get(image_id, []),
            coco.category_names,
            width,
            height,
            with_masks=with_masks,
            include_crowd=True,
            problems=problems,
        )
        index_of = {o["id"]: k for k, o in enumerate(objects)}
        expressions, region_captions = [], [""] * len(objects)
        for ref in image_refs:
            record = f"ref {ref['ref_id']}"
            object_index = index_of.get(str(ref["ann_id"]))
            if object_index is None:
                problems.add(record, f"annotation {ref['ann_id']} is missing from or malformed in `instances_path`")
                continue
            texts = _ref_sentences(ref)
            if not texts:
                problems.add(record, "'sentences' must be a non-empty list of {'sent': str, ...} dicts")
                continue
            expressions.extend({"text": text, "object_index": object_index, "kind": dataset} for text in texts)
            region_captions[object_index] = region_captions[object_index] or texts[0]
        if expressions:
            rows.append(
                _coco_scene_row(
                    image_id,
                    path,
                    width,
                    height,
                    objects,
                    dataset,
                    with_masks,
                    referring_expressions=expressions,
                    region_captions=region_captions,
                )
            )
    problems.warn()
    description = f"{dataset} {split} split from {Path(refs_path).name} and {instances.name}."
    return _dataset(rows, _scene_features(with_masks, True), description, split)


# ---------------------------------------------------------------------------------------------------------------------
# Visual Genome region descriptions
# ---------------------------------------------------------------------------------------------------------------------


def _vg_image_data(path: Path) -> dict[object, Mapping]:
    entries = _json_list(path, "image_data_path", "image records")
    by_id = {}
    for entry in entries:
        # VG 1.2 names the key `image_id`, VG 1.0 `id`.
        if isinstance(entry, Mapping) and ("image_id" in entry or "id" in entry):
            by_id[entry.get("image_id", entry.get("id"))] = entry
    return by_id


def _vg_image_path(images_dir: Path, image_id: object, info: Mapping | None) -> tuple[Path | None, list[Path]]:
    candidates = []
    if info is not None and isinstance(info.get("url"), str):
        # The url ends in `VG_100K/<id>.jpg` or `VG_100K_2/<id>.jpg`, the two folders of the public download.
        parts = PurePosixPath(urlparse(info["url"]).path).parts[-2:]
        candidates += [images_dir.joinpath(*parts), images_dir / parts[-1]]
    name = f"{image_id}.jpg"
    candidates += [images_dir / name, images_dir / "VG_100K" / name, images_dir / "VG_100K_2" / name]
    return next((c for c in candidates if c.is_file()), None), candidates


def load_visual_genome_regions(
    region_descriptions_path: PathLike,
    images_dir: PathLike,
    image_data_path: PathLike | None = None,
    *,
    max_images: int | None = None,
    strict: bool = False,
) -> datasets.Dataset:
    """Read Visual Genome region descriptions (RegionBLIP's and Groma's region-caption data).

    Args:
        region_descriptions_path: ``region_descriptions.json``: a list of ``{id, regions: [{region_id, image_id,
            phrase, x, y, width, height}]}`` with boxes in pixel xywh.
        images_dir: the folder holding the images, either flat (``<id>.jpg``) or as the public ``VG_100K/`` and
            ``VG_100K_2/`` sub-folders.
        image_data_path: optional ``image_data.json`` (``{image_id | id, width, height, url}``); gives image sizes
            without opening the images and the sub-folder of each image. Without it sizes are read from the image
            headers.
        max_images: stop after this many images; ``None`` reads all.
        strict: raise at the first malformed record instead of skipping it with a :class:`MalformedRecordWarning`.

    Returns:
        One row per image with :func:`scene_features` columns without ``masks``, plus ``object_ids`` (region ids).
        ``scene_id`` is ``"vg/<image_id>"``, ``boxes`` ``[x, y, x + width, y + height]`` float32 absolute pixel
        xyxy and ``region_captions`` the phrases, in the file's region order.
    """
    descriptions = _existing_file(region_descriptions_path, "region_descriptions_path", "VG region_descriptions.json")
    images_root = _existing_dir(images_dir, "images_dir", "the folder of the Visual Genome images")
    image_data = {}
    if image_data_path is not None:
        image_data = _vg_image_data(_existing_file(image_data_path, "image_data_path", "VG image_data.json"))
    max_images = _optional_count(max_images, "max_images")
    problems = _Problems("load_visual_genome_regions", strict)
    entries = _json_list(descriptions, "region_descriptions_path", "{id, regions} image records")
    rows = []
    for position, entry in enumerate(entries):
        if max_images is not None and len(rows) >= max_images:
            break
        if not isinstance(entry, Mapping) or not isinstance(entry.get("regions"), list):
            problems.add(f"image entry at position {position}", "needs 'id' and a 'regions' list")
            continue
        regions = entry["regions"]
        image_id = entry.get("id", entry.get("image_id"))
        if image_id is None and regions and isinstance(regions[0], Mapping):
            image_id = regions[0].get("image_id")
        if image_id is None:
            problems.add(f"image entry at position {position}", "has no 'id'")
            continue
        info = image_data.get(image_id)
        path, candidates = _vg_image_path(images_root, image_id, info)
        if path is None:
            problems.add(f"image {image_id}", f"image file not found (looked for {[str(c) for c in candidates]})")
            continue
        if info is not None and isinstance(info.get("width"), int) and isinstance(info.get("height"), int):
            width, height = info["width"], info["height"]
        else:
            try:
                with Image.open(path) as picture:
                    width, height = picture.size
            except OSError as error:
                problems.add(f"image {image_id}", f"cannot read {path}: {error}")
                continue
        boxes, captions, region_ids = [], [], []
        for region_position, region in enumerate(regions):
            if not isinstance(region, Mapping):
                problems.add(f"region at position {region_position} (image {image_id})", "is not an object")
                continue
            record = f"region {region.get('region_id', f'at position {region_position}')} (image {image_id})"
            missing = _missing_keys(region, ("region_id", "phrase", "x", "y", "width", "height"))
            if missing:
                problems.add(record, missing)
                continue
            try:
                corners = coco_xywh_to_xyxy([region["x"], region["y"], region["width"], region["height"]]).tolist()
            except (TypeError, ValueError):
                corners = [region["x"], region["y"], region["width"], region["height"]]
            box, why = _image_box(corners, width, height)
            phrase = region["phrase"].strip() if isinstance(region["phrase"], str) else ""
            if box is None or not phrase:
                problems.add(record, why or f"'phrase' must be a non-empty string; got {region['phrase']!r}")
                continue
            boxes.append(box)
            captions.append(phrase)
            region_ids.append(str(region["region_id"]))
        rows.append(
            _scene_row(
                path, f"vg/{image_id}", width, height, boxes=boxes, region_captions=captions, object_ids=region_ids
            )
        )
    problems.warn()
    return _dataset(rows, _scene_features(False, False), f"Visual Genome regions from {descriptions.name}.", None)


# ---------------------------------------------------------------------------------------------------------------------
# Flickr30k Entities
# ---------------------------------------------------------------------------------------------------------------------

_FLICKR_PHRASE = re.compile(r"\[/EN#(?P<id>\d+)(?P<types>(?:/[^/\s\[\]]+)+)\s+(?P<text>[^\[\]]*?)\s*\]")


@dataclass(frozen=True)
class Flickr30kPhrase:
    """One annotated phrase of a Flickr30k Entities sentence.

    ``start`` / ``end`` are character offsets of ``text`` in the plain sentence :func:`parse_flickr30k_sentence`
    returns; ``phrase_id`` ``"0"`` marks phrases annotated as not visual.
    """

    text: str
    phrase_id: str
    phrase_types: tuple[str, ...]
    start: int
    end: int


def parse_flickr30k_sentence(line: str) -> tuple[str, list[Flickr30kPhrase]]:
    """Parse one line of a Flickr30k Entities ``Sentences/<id>.txt`` file.

    ``"[/EN#18/people A man] in [/EN#19/clothing a blue shirt] ."`` gives the plain sentence
    ``"A man in a blue shirt ."`` and the phrases ``A man`` (id ``"18"``, types ``("people",)``, characters 0-5) and
    ``a blue shirt`` (id ``"19"``, types ``("clothing",)``, characters 9-21).

    Raises:
        ValueError: a ``[`` or ``]`` outside a well-formed ``[/EN#<id>/<type>[/<type>...] <text>]`` annotation.
    """
    if not isinstance(line, str):
        raise TypeError(f"`line` must be a str; got {type(line).__name__}.")
    line = line.strip()
    pieces: list[str] = []
    phrases: list[Flickr30kPhrase] = []
    cursor = length = 0
    for match in _FLICKR_PHRASE.finditer(line):
        outside = line[cursor : match.start()]
        if "[" in outside or "]" in outside:
            break
        pieces.append(outside)
        length += len(outside)
        text = match["text"]
        phrases.append(
            Flickr30kPhrase(text, match["id"], tuple(match["types"].split("/")[1:]), length, length + len(text))
        )
        pieces.append(text)
        length += len(text)
        cursor = match.end()
    tail = line[cursor:]
    if "[" in tail or "]" in tail:
        raise ValueError(
            f"`line` has a malformed phrase annotation near {tail[:60]!r}; Flickr30k Entities phrases look like "
            "'[/EN#18/people A man]'."
        )
    pieces.append(tail)
    return "".join(pieces), phrases


def flickr30k_grounded_caption(
    plain_text: str, phrases: Sequence[Flickr30kPhrase], phrase_boxes: Mapping[str, Sequence[int]]
) -> tuple[str, list[int]]:
    """Groma grounded caption of a parsed sentence: ``<p>A man</p><roi><r0></roi> in <p>a blue shirt</p>...``.

    Args:
        plain_text, phrases: the output of :func:`parse_flickr30k_sentence`.
        phrase_boxes: phrase id -> indices of its boxes in the image's box list (a phrase may have several boxes,
            and a box several phrases). Phrases without boxes (not visual, scene, no box drawn) stay plain text.

    Returns:
        ``(grounded_caption, box_indices)``: ``<rK>`` indexes ``box_indices``, the image-level indices of the
        grounded boxes in order of first mention, so ``K = 0`` is the first box the sentence mentions.
    """
    order: dict[int, int] = {}
    pieces, cursor = [], 0
    for phrase in phrases:
        pieces.append(plain_text[cursor : phrase.start])
        boxes = [] if phrase.phrase_id == "0" else phrase_boxes.get(phrase.phrase_id, [])
        if boxes:
            slots = "".join(f"<r{order.setdefault(int(box), len(order))}>" for box in boxes)
            pieces.append(f"<p>{phrase.text}</p><roi>{slots}</roi>")
        else:
            pieces.append(phrase.text)
        cursor = phrase.end
    pieces.append(plain_text[cursor:])
    return "".join(pieces), list(order)


def _read_flickr30k_boxes(
    path: Path, image_id: str, problems: _Problems
) -> tuple[int, int, list[list[float]], list[list[str]], dict[str, list[int]]]:
    """``(width, height, boxes, box_phrase_ids, phrase_boxes)`` of one ``Annotations/<id>.xml``; bad boxes reported.

    Raises:
        ValueError: the file is not parseable XML with a ``<size>``.
    """
    try:
        root = ElementTree.parse(path).getroot()
        width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
    except (ElementTree.ParseError, TypeError, ValueError) as error:
        raise ValueError(f"{path.name} is not a Flickr30k Entities annotation with <size> ({error})") from None
    boxes: list[list[float]] = []
    box_phrase_ids: list[list[str]] = []
    phrase_boxes: dict[str, list[int]] = {}
    for element in root.findall("object"):
        names = [name.text.strip() for name in element.findall("name") if name.text and name.text.strip()]
        bndbox = element.find("bndbox")
        if bndbox is None or not names:
            continue
        record = f"image {image_id} phrase(s) {'/'.join(names)}"
        try:
            xmin, ymin, xmax, ymax = (float(bndbox.findtext(key)) for key in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            problems.add(record, "<bndbox> needs numeric xmin, ymin, xmax, ymax")
            continue
        # 1-based inclusive PASCAL-VOC corners to pixel-edge xyxy.
        box, why = _image_box([xmin - 1, ymin - 1, xmax, ymax], width, height)
        if box is None:
            problems.add(record, why)
            continue
        for name in names:
            phrase_boxes.setdefault(name, []).append(len(boxes))
        boxes.append(box)
        box_phrase_ids.append(names)
    return width, height, boxes, box_phrase_ids, phrase_boxes


def _flickr30k_image_ids(annotations_dir: Path, split_file: PathLike | None) -> list[str]:
    if split_file is None:
        return sorted(path.stem for path in annotations_dir.glob("*.xml"))
    path = _existing_file(split_file, "split_file", "a Flickr30k Entities split list (train.txt / val.txt / test.txt)")
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def load_flickr30k_entities(
    annotations_dir: PathLike,
    sentences_dir: PathLike,
    images_dir: PathLike,
    split_file: PathLike | None = None,
    *,
    strict: bool = False,
) -> datasets.Dataset:
    """Read Flickr30k Entities as grounded captions (Groma's grounded-caption data, ``flickr.py`` in §1c).

    Args:
        annotations_dir: the ``Annotations/`` folder: ``<id>.xml`` in PASCAL-VOC layout, one ``<object>`` per box
            whose ``<name>`` elements are the phrase ids it grounds, 1-based inclusive ``<bndbox>`` corners.
        sentences_dir: the ``Sentences/`` folder: ``<id>.txt``, one sentence per line with phrases annotated as
            ``[/EN#<phrase id>/<type> <text>]``.
        images_dir: folder of ``<id>.jpg``.
        split_file: optional ``train.txt`` / ``val.txt`` / ``test.txt`` (one image id per line); default every
            ``.xml`` in ``annotations_dir``.
        strict: raise at the first malformed record instead of skipping it with a :class:`MalformedRecordWarning`.

    Returns:
        One row per sentence with :func:`scene_features` columns without ``masks``, plus ``object_ids`` (the
        phrase ids of each box, joined by ``/``). ``scene_id`` is ``"flickr30k/<image id>/<sentence index>"``;
        ``boxes`` holds the boxes the sentence grounds in order of first mention, absolute pixel xyxy float32
        (``[xmin - 1, ymin - 1, xmax, ymax]``); ``grounded_caption`` is Groma's ``<p>A man</p><roi><r0></roi> in
        ...`` with one ``<rK>`` per box of a phrase; ``image_caption`` the plain sentence; ``categories`` and
        ``region_captions`` the entity type and text of the first phrase of each box; ``referring_expressions`` the
        phrases grounded to exactly one box.
    """
    annotations_root = _existing_dir(annotations_dir, "annotations_dir", "the Flickr30k Entities Annotations/ folder")
    sentences_root = _existing_dir(sentences_dir, "sentences_dir", "the Flickr30k Entities Sentences/ folder")
    images_root = _existing_dir(images_dir, "images_dir", "the folder of the Flickr30k images")
    problems = _Problems("load_flickr30k_entities", strict)
    rows = []
    for image_id in _flickr30k_image_ids(annotations_root, split_file):
        annotation_path = annotations_root / f"{image_id}.xml"
        sentence_path = sentences_root / f"{image_id}.txt"
        image_path = images_root / f"{image_id}.jpg"
        missing = [str(p) for p in (annotation_path, sentence_path, image_path) if not p.is_file()]
        if missing:
            problems.add(f"image {image_id}", f"file(s) not found: {missing}")
            continue
        try:
            width, height, image_boxes, box_phrase_ids, phrase_boxes = _read_flickr30k_boxes(
                annotation_path, image_id, problems
            )
            with open(sentence_path, encoding="utf-8") as handle:
                lines = [line for line in handle if line.strip()]
        except (ValueError, UnicodeDecodeError) as error:
            problems.add(f"image {image_id}", str(error))
            continue
        for sentence_index, line in enumerate(lines):
            try:
                plain, phrases = parse_flickr30k_sentence(line)
            except ValueError as error:
                problems.add(f"image {image_id} sentence {sentence_index}", str(error))
                continue
            grounded, box_indices = flickr30k_grounded_caption(plain, phrases, phrase_boxes)
            local = {box: k for k, box in enumerate(box_indices)}
            categories, captions = [""] * len(box_indices), [""] * len(box_indices)
            expressions = []
            for phrase in phrases:
                boxes = [] if phrase.phrase_id == "0" else phrase_boxes.get(phrase.phrase_id, [])
                for box in boxes:
                    if not captions[local[box]]:
                        captions[local[box]] = phrase.text
                        categories[local[box]] = phrase.phrase_types[0]
                if len(boxes) == 1:
                    expression = {"text": phrase.text, "object_index": local[boxes[0]], "kind": "phrase"}
                    if expression not in expressions:
                        expressions.append(expression)
            rows.append(
                _scene_row(
                    image_path,
                    f"flickr30k/{image_id}/{sentence_index}",
                    width,
                    height,
                    boxes=[image_boxes[box] for box in box_indices],
                    categories=categories,
                    region_captions=captions,
                    referring_expressions=expressions,
                    image_caption=plain,
                    grounded_caption=grounded,
                    object_ids=["/".join(box_phrase_ids[box]) for box in box_indices],
                )
            )
    problems.warn()
    return _dataset(rows, _scene_features(False, False), "Flickr30k Entities grounded captions.", None)


# ---------------------------------------------------------------------------------------------------------------------
# Point clouds: reading and sampling
# ---------------------------------------------------------------------------------------------------------------------

_NPZ_POINT_KEYS = ("points", "xyz", "pc", "arr_0")


def _read_point_array(path: Path) -> np.ndarray:
    """``(N, C >= 3)`` float64 of a ``.npy`` / ``.npz`` point file, never unpickling; ``ValueError`` says why not."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.files)
                key = keys[0] if len(keys) == 1 else next((k for k in _NPZ_POINT_KEYS if k in keys), None)
                if key is None:
                    raise ValueError(f"it holds arrays {keys}; expected one array or one named {_NPZ_POINT_KEYS}")
                array = archive[key]
        else:
            array = np.load(path, allow_pickle=False)
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as error:
        raise ValueError(f"cannot read {path.name} as a numpy point array ({error})") from None
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{path.name} does not hold a numeric array")
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] < 3:
        raise ValueError(
            f"{path.name} holds shape {array.shape}; expected (N, 3) xyz, (N, 6) xyz + rgb or more columns, N >= 1"
        )
    array = array.astype(np.float64)
    if not np.isfinite(array[:, :6]).all():
        raise ValueError(f"{path.name} has non-finite coordinates or colours")
    return array


def _record_rng(seed: int, record_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(record_id.encode("utf-8"))])


def _sample_points(
    array: np.ndarray, num_points: int, with_color: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(points, indices)``: ``(num_points, 3 | 6)`` float32 xyz (+ rgb in [0, 1]) and the rows of ``array`` used."""
    if with_color and array.shape[1] < 6:
        raise ValueError(f"the points have {array.shape[1]} columns (xyz only) but `with_color=True` needs xyz + rgb")
    count = array.shape[0]
    indices = rng.choice(count, num_points, replace=count < num_points)
    points = array[indices, :3]
    if with_color:
        colors = array[indices, 3:6]
        if array[:, 3:6].max() > 1.0:
            colors = colors / 255.0
        if colors.min() < 0.0 or colors.max() > 1.0:
            raise ValueError("the point colours are in neither [0, 1] nor [0, 255]")
        points = np.concatenate([points, colors], axis=1)
    return points.astype(np.float32), indices


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int; got {seed!r}.")
    return int(seed)


# ---------------------------------------------------------------------------------------------------------------------
# ScanRefer
# ---------------------------------------------------------------------------------------------------------------------

# (points, boxes) file pairs of ScanRefer's preprocessed `scannet_data/` folder, aligned (axis-aligned scans) first.
_SCANNET_FILE_PAIRS = (
    ("{}_aligned_vert.npy", "{}_aligned_bbox.npy"),
    ("{}_vert.npy", "{}_bbox.npy"),
    ("{}.npy", "{}_bbox.npy"),
    ("{}.npy", "{}_aligned_bbox.npy"),
)


def _scene_3d_features(num_points: int, with_color: bool) -> datasets.Features:
    features = dict(scene_3d_features(num_points, with_color))
    features["object_ids"] = datasets.List(datasets.Value("string"))
    return datasets.Features(features)


def _scanrefer_entries(path: Path, problems: _Problems) -> dict[str, list[dict]]:
    """Valid ScanRefer entries grouped by scene, in file order: ``{scene_id: [{object_id, name, ann_id, text}]}``."""
    entries = _json_list(path, "scanrefer_json", "{scene_id, object_id, object_name, ann_id, description} records")
    by_scene: dict[str, list[dict]] = {}
    for position, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            problems.add(f"entry at position {position}", "is not an object")
            continue
        record = (
            f"{entry.get('scene_id', '?')}/object {entry.get('object_id', '?')}/ann {entry.get('ann_id', position)}"
        )
        missing = _missing_keys(entry, ("scene_id", "object_id", "object_name", "ann_id", "description"))
        if missing:
            problems.add(record, missing)
            continue
        try:
            object_id = int(entry["object_id"])
        except (TypeError, ValueError):
            problems.add(record, f"'object_id' must be an integer; got {entry['object_id']!r}")
            continue
        text = entry["description"].strip() if isinstance(entry["description"], str) else ""
        if not text:
            problems.add(record, "'description' must be a non-empty string")
            continue
        by_scene.setdefault(str(entry["scene_id"]), []).append(
            {
                "object_id": object_id,
                "name": str(entry["object_name"]).replace("_", " "),
                "record": record,
                "text": text,
            }
        )
    return by_scene


def _read_scannet_scene(points_dir: Path, scene_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(points (N, C), boxes (n, 8), instance labels (N,) | None)`` of one scene; ``ValueError`` says what is wrong."""
    if Path(scene_id).name != scene_id or scene_id in ("", ".", ".."):
        raise ValueError("the scene id must be a plain file name prefix such as 'scene0000_00'")
    for points_pattern, boxes_pattern in _SCANNET_FILE_PAIRS:
        points_path = points_dir / points_pattern.format(scene_id)
        boxes_path = points_dir / boxes_pattern.format(scene_id)
        if points_path.is_file() and boxes_path.is_file():
            break
    else:
        tried = [f"{p.format(scene_id)} + {b.format(scene_id)}" for p, b in _SCANNET_FILE_PAIRS]
        raise ValueError(f"no point and box files in {points_dir} (looked for {tried})")
    points = _read_point_array(points_path)
    try:
        boxes = np.load(boxes_path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as error:
        raise ValueError(f"cannot read {boxes_path.name} ({error})") from None
    if boxes.ndim != 2 or boxes.shape[1] != 8 or not np.issubdtype(boxes.dtype, np.number):
        raise ValueError(
            f"{boxes_path.name} holds shape {boxes.shape}; expected (n, 8): cx cy cz sx sy sz label object_id"
        )
    instance_path = points_dir / f"{scene_id}_ins_label.npy"
    instances = None
    if instance_path.is_file():
        try:
            instances = np.load(instance_path, allow_pickle=False)
        except (OSError, EOFError, ValueError) as error:
            raise ValueError(f"cannot read {instance_path.name} ({error})") from None
        if instances.shape != (points.shape[0],) or not np.issubdtype(instances.dtype, np.integer):
            raise ValueError(
                f"{instance_path.name} holds {instances.dtype} shape {instances.shape}; expected ({points.shape[0]},) "
                "integers, one per point"
            )
    return points, boxes.astype(np.float64), instances


def load_scanrefer(
    scanrefer_json: PathLike,
    points_dir: PathLike,
    *,
    num_points: int = 8192,
    with_color: bool = False,
    seed: int = 0,
    strict: bool = False,
) -> datasets.Dataset:
    """Read ScanRefer descriptions with the preprocessed ScanNet scenes (RegionBLIP's P-region-text data).

    Args:
        scanrefer_json: ``ScanRefer_filtered_{train,val}.json``: a list of ``{scene_id, object_id, object_name,
            ann_id, description, token}``.
        points_dir: ScanRefer's ``scannet_data/`` folder with, per scene, the points ``<scene_id>_aligned_vert.npy``
            (or ``_vert.npy`` / ``<scene_id>.npy``): ``(N, 3)`` xyz, ``(N, 6)`` xyz + rgb or more columns; the boxes
            ``<scene_id>_aligned_bbox.npy`` (or ``_bbox.npy``): ``(n, 8)`` ``cx cy cz sx sy sz label object_id``
            with the NYU40 ``label``; and optionally ``<scene_id>_ins_label.npy``: ``(N,)`` instance ids, ``object_id
            + 1`` per point and 0 for unannotated points, as ScanRefer's export writes them.
        num_points: points per scene in the output (random subset, with replacement when the scene has fewer).
        with_color: keep rgb (scaled to ``[0, 1]``); scenes stored as xyz only are then malformed.
        seed: with the scene id, fixes the point subset.
        strict: raise at the first malformed record instead of skipping it with a :class:`MalformedRecordWarning`.

    Returns:
        One row per scene (sorted by scene id) with :func:`scene_3d_features` columns plus ``object_ids``.
        ``boxes_3d`` ``(n, 6)`` float32 ``center + size`` in the scene frame, one per object of the box file;
        ``point_labels`` ``(num_points,)`` object index or -1 (all -1 without an instance file); ``categories`` the
        ScanRefer ``object_name`` of referred objects and the NYU40 class of the others; ``referring_expressions``
        ``{text: description, object_index, kind: "scanrefer"}``; ``object_captions`` the first description of each
        referred object, ``""`` for the others.
    """
    annotations = _existing_file(scanrefer_json, "scanrefer_json", "a ScanRefer JSON (ScanRefer_filtered_val.json)")
    points_root = _existing_dir(points_dir, "points_dir", "ScanRefer's scannet_data/ folder of .npy files")
    num_points = _positive_int(num_points, "num_points")
    with_color, seed = _flag(with_color, "with_color"), _check_seed(seed)
    problems = _Problems("load_scanrefer", strict)
    rows = []
    for scene_id, entries in sorted(_scanrefer_entries(annotations, problems).items()):
        try:
            array, boxes, instances = _read_scannet_scene(points_root, scene_id)
            points, indices = _sample_points(array, num_points, with_color, _record_rng(seed, scene_id))
        except ValueError as error:
            problems.add(f"scene {scene_id}", str(error))
            continue
        object_ids, boxes_3d, labels = [], [], []
        for box in boxes:
            object_id = int(box[7])
            if not np.isfinite(box[:6]).all() or (box[3:6] <= 0).any():
                problems.add(f"{scene_id}/object {object_id}", f"box {_fmt(box[:6])} is not finite or has zero size")
                continue
            object_ids.append(object_id)
            boxes_3d.append(box[:6].astype(np.float32).tolist())
            labels.append(int(box[6]))
        index_of = {object_id: k for k, object_id in enumerate(object_ids)}
        point_labels = np.full(num_points, -1, dtype=np.int32)
        if instances is not None:
            sampled = instances[indices]
            for k, object_id in enumerate(object_ids):
                point_labels[sampled == object_id + 1] = k
        categories = [_NYU40_CLASSES[label - 1] if 1 <= label <= 40 else "" for label in labels]
        referred = [False] * len(object_ids)
        captions, expressions = [""] * len(object_ids), []
        for entry in entries:
            k = index_of.get(entry["object_id"])
            if k is None:
                problems.add(
                    entry["record"], f"object {entry['object_id']} has no (valid) box in the scene's box file"
                )
                continue
            if not referred[k]:
                referred[k] = True
                categories[k], captions[k] = entry["name"], entry["text"]
            expressions.append({"text": entry["text"], "object_index": k, "kind": "scanrefer"})
        if not expressions:
            continue
        rows.append(
            {
                "scene_id": scene_id,
                "points": points,
                "point_labels": point_labels,
                "boxes_3d": boxes_3d,
                "categories": categories,
                "colors": [],
                "sizes": [],
                "object_captions": captions,
                "referring_expressions": expressions,
                "caption": "",
                "object_ids": [str(object_id) for object_id in object_ids],
            }
        )
    problems.warn()
    return _dataset(
        rows, _scene_3d_features(num_points, with_color), f"ScanRefer scenes from {annotations.name}.", None
    )


# ---------------------------------------------------------------------------------------------------------------------
# Cap3D
# ---------------------------------------------------------------------------------------------------------------------

# RegionBLIP/ULIP name Objaverse point files `<uid>_8192.npz`.
_CAP3D_POINT_FILES = ("{}.npy", "{}.npz", "{}_8192.npz")


def load_cap3d(
    captions_csv: PathLike,
    points_dir: PathLike,
    *,
    num_points: int = 8192,
    with_color: bool = False,
    seed: int = 0,
    max_samples: int | None = None,
    strict: bool = False,
) -> datasets.Dataset:
    """Read Cap3D object captions with their point clouds (RegionBLIP's P-text data, Objaverse objects).

    Args:
        captions_csv: Cap3D captions CSV, two columns and no header: ``uid,caption`` (captions with commas quoted).
        points_dir: folder of ``<uid>.npy``, ``<uid>.npz`` or ``<uid>_8192.npz`` point files: ``(N, 3)`` xyz or
            ``(N, 6)`` xyz + rgb (an ``.npz`` holds one array, or one named ``points``, ``xyz``, ``pc`` or ``arr_0``).
        num_points: points per object in the output (random subset, with replacement when the file has fewer).
        with_color: keep rgb (scaled to ``[0, 1]``); xyz-only files are then malformed.
        seed: with the uid, fixes the point subset.
        max_samples: stop after this many objects; ``None`` reads all.
        strict: raise at the first malformed record instead of skipping it with a :class:`MalformedRecordWarning`.

    Returns:
        One row per CSV line with :func:`point_cloud_features` columns: ``sample_id`` the uid, ``points``
        ``(num_points, 3 | 6)`` float32 in the file's frame (no normalisation), ``caption``; ``category`` /
        ``color`` / ``size`` are ``""``, ``scale`` 1 and ``rotation`` the identity (the file's frame is canonical).
    """
    captions = _existing_file(captions_csv, "captions_csv", "a Cap3D captions CSV (uid,caption)")
    points_root = _existing_dir(points_dir, "points_dir", "the folder of <uid>.npy / <uid>.npz point files")
    num_points = _positive_int(num_points, "num_points")
    with_color, seed = _flag(with_color, "with_color"), _check_seed(seed)
    max_samples = _optional_count(max_samples, "max_samples")
    problems = _Problems("load_cap3d", strict)
    rows = []
    with open(captions, newline="", encoding="utf-8") as handle:
        for line_number, fields in enumerate(csv.reader(handle), start=1):
            if max_samples is not None and len(rows) >= max_samples:
                break
            if not fields or not any(field.strip() for field in fields):
                continue
            if len(fields) != 2:
                problems.add(f"line {line_number}", f"has {len(fields)} fields; expected uid,caption")
                continue
            uid, caption = fields[0].strip(), fields[1].strip()
            record = f"uid {uid!r} (line {line_number})"
            if not uid or Path(uid).name != uid or uid in (".", ".."):
                problems.add(record, "the uid must be a non-empty plain file name")
                continue
            if not caption:
                problems.add(record, "has an empty caption")
                continue
            path = next(
                (points_root / p.format(uid) for p in _CAP3D_POINT_FILES if (points_root / p.format(uid)).is_file()),
                None,
            )
            if path is None:
                problems.add(record, f"no point file {[p.format(uid) for p in _CAP3D_POINT_FILES]} in {points_root}")
                continue
            try:
                points, _ = _sample_points(_read_point_array(path), num_points, with_color, _record_rng(seed, uid))
            except ValueError as error:
                problems.add(record, str(error))
                continue
            rows.append(
                {
                    "sample_id": uid,
                    "points": points,
                    "category": "",
                    "color": "",
                    "size": "",
                    "caption": caption,
                    "scale": 1.0,
                    "rotation": np.eye(3, dtype=np.float32),
                }
            )
    problems.warn()
    return _dataset(rows, point_cloud_features(num_points, with_color), f"Cap3D captions from {captions.name}.", None)
