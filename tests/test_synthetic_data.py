"""Tests of the synthetic data sets: determinism, split disjointness, schema and the truth of every annotation.

Expressions, answers and grounded captions are checked with small resolvers written here, independent of the
generator's own helpers.
"""

from __future__ import annotations

import hashlib
import re

import datasets
import numpy as np
import pytest

from hf_regionmm.data import synthetic as S

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SPECIAL = re.compile(r"<r\d+>|</?p>|</?roi>|\[grounding\]|\[SEG\]|\[LOC\]|\[/?tag\]")
GROUNDED_PHRASE = re.compile(r"<p>(.*?)</p><roi>((?:<r\d+>)+)</roi>")


@pytest.fixture(scope="module")
def scenes() -> datasets.Dataset:
    return S.generate_scenes(40, seed=7)


@pytest.fixture(scope="module")
def rows(scenes) -> list[dict]:
    return [scenes[i] for i in range(len(scenes))]


# --- independent resolvers -------------------------------------------------------------------------------------------


def parse_description(text: str, shapes: tuple[str, ...]) -> dict[str, str]:
    words = text.split()
    assert words[-1] in shapes, text
    description = {"shape": words[-1]}
    for word in words[:-1]:
        if word in S.SIZES:
            description["size"] = word
        elif word in S.COLORS:
            description["color"] = word
        else:
            raise AssertionError(f"unexpected word {word!r} in description {text!r}")
    return description


def matching(objects: list[dict], description: dict[str, str]) -> list[int]:
    return [j for j, obj in enumerate(objects) if all(obj[key] == value for key, value in description.items())]


def resolve(
    text: str,
    objects: list[dict],
    mins: np.ndarray,
    maxs: np.ndarray,
    relations: dict,
    ordinals: dict,
    shapes: tuple[str, ...],
    loose: bool,
) -> list[int]:
    """Indices of the objects ``text`` describes; relations by box separation, or by centres when ``loose``."""
    centers = (mins + maxs) / 2
    ordinal_words = "|".join(ORDINALS)
    match = re.fullmatch(rf"the ({ordinal_words}) (.+) from the ({'|'.join(ordinals)})", text)
    if match:
        candidates = matching(objects, parse_description(match.group(2), shapes))
        axis, descending = ordinals[match.group(3)]
        coordinates = centers[candidates, axis] * (-1 if descending else 1)
        assert len(set(coordinates.tolist())) == len(candidates), f"tied ordinal order in {text!r}"
        ranked = [candidates[i] for i in np.argsort(coordinates)]
        return [ranked[ORDINALS.index(match.group(1))]]
    match = re.fullmatch(rf"the (.+?) ({'|'.join(relations)}) the (.+)", text)
    if match:
        anchors = matching(objects, parse_description(match.group(3), shapes))
        assert len(anchors) == 1, f"ambiguous anchor in {text!r}"
        anchor = anchors[0]
        axis, sign = relations[match.group(2)]
        found = []
        for j in matching(objects, parse_description(match.group(1), shapes)):
            if j == anchor:
                continue
            if loose:
                holds = (centers[j, axis] - centers[anchor, axis]) * sign > 0
            else:
                holds = maxs[j, axis] <= mins[anchor, axis] if sign < 0 else mins[j, axis] >= maxs[anchor, axis]
            if holds:
                found.append(j)
        return found
    match = re.fullmatch(r"the (.+)", text)
    assert match, text
    return matching(objects, parse_description(match.group(1), shapes))


RELATIONS_2D = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
ORDINALS_2D = {"left": (0, False), "right": (0, True), "top": (1, False), "bottom": (1, True)}
RELATIONS_3D = {"left of": (0, -1), "right of": (0, 1), "in front of": (1, -1), "behind": (1, 1)}
ORDINALS_3D = {"left": (0, False), "right": (0, True), "front": (1, False), "back": (1, True)}


def scene_objects(row: dict) -> list[dict]:
    return [
        {"shape": shape, "color": color, "size": size}
        for shape, color, size in zip(row["categories"], row["colors"], row["sizes"])
    ]


def image_hash(image_bytes: bytes) -> str:
    return hashlib.sha256(image_bytes).hexdigest()


# --- determinism, splits, schema -------------------------------------------------------------------------------------


def test_same_arguments_give_byte_identical_data():
    first = S.generate_scenes(3, seed=5, image_size_range=(96, 160))
    second = S.generate_scenes(3, seed=5, image_size_range=(96, 160))
    assert first.data.table.equals(second.data.table)
    other_seed = S.generate_scenes(3, seed=6, image_size_range=(96, 160))
    assert not first.data.table.equals(other_seed.data.table)
    for generate in (
        lambda: S.generate_videos(2, seed=1, num_frames=3, image_size=64),
        lambda: S.generate_point_clouds(2, seed=1, num_points=128, with_color=True),
        lambda: S.generate_3d_scenes(2, seed=1, num_points=512),
    ):
        assert generate().data.table.equals(generate().data.table)


def test_first_examples_do_not_depend_on_how_many_are_generated():
    short = S.generate_scenes(2, seed=3, image_size_range=(96, 128))
    long = S.generate_scenes(4, seed=3, image_size_range=(96, 128))
    assert short.data.table.equals(long.select(range(2)).data.table)


def test_splits_never_share_a_scene():
    hashes, ids = {}, {}
    for split in ("train", "validation", "test"):
        ds = S.generate_scenes(15, seed=0, split=split, image_size_range=(96, 128)).cast_column(
            "image", datasets.Image(decode=False)
        )
        hashes[split] = {image_hash(image["bytes"]) for image in ds["image"]}
        ids[split] = set(ds["scene_id"])
        assert len(hashes[split]) == 15
    assert not hashes["train"] & hashes["validation"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["validation"] & hashes["test"]
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
    clouds = {
        split: {S.generate_point_clouds(3, split=split, num_points=64)["points"][i][0][0] for i in range(3)}
        for split in ("train", "test")
    }
    assert not clouds["train"] & clouds["test"]


def test_scene_schema(scenes, rows):
    features = scenes.features
    assert features == S.scene_features(with_masks=True)
    assert isinstance(features["image"], datasets.Image)
    assert features["width"] == datasets.Value("int32") and features["height"] == datasets.Value("int32")
    assert features["boxes"].feature.length == 4 and features["boxes"].feature.feature == datasets.Value("float32")
    assert features["concept_targets"].feature.length == len(S.CONCEPT_VOCABULARY)
    assert set(features["referring_expressions"].feature) == {"text", "object_index", "kind"}
    assert set(features["ullava_instructions"].feature) == {"task", "instruction", "answer", "object_indices"}
    assert len(set(scenes["scene_id"])) == len(scenes)
    for row in rows[:5]:
        assert row["image"].mode == "RGB"
        assert row["image"].size == (row["width"], row["height"])
        assert 224 <= row["width"] <= 512 and 224 <= row["height"] <= 512
        n = len(row["boxes"])
        assert 2 <= n <= 6
        for column in ("masks", "categories", "colors", "sizes", "concept_targets", "region_captions"):
            assert len(row[column]) == n, column


# --- masks and boxes -------------------------------------------------------------------------------------------------


def test_rle_matches_hand_computed_counts_and_round_trips():
    # Column-major: [[0, 1], [1, 1]] flattens to 0, 1, 1, 1 -> one background run, then three foreground pixels.
    assert S.encode_rle(np.array([[0, 1], [1, 1]], dtype=bool)) == [1, 3]
    # A foreground first pixel starts with an empty background run, as COCO expects.
    assert S.encode_rle(np.array([[1, 0], [0, 0]], dtype=bool)) == [0, 1, 3]
    assert S.encode_rle(np.zeros((2, 3), dtype=bool)) == [6]
    mask = np.random.default_rng(0).random((7, 5)) > 0.5
    assert np.array_equal(S.decode_rle(S.encode_rle(mask), 7, 5), mask)
    with pytest.raises(ValueError, match="height \\* width"):
        S.decode_rle([1, 3], 3, 3)


def nearest_color(rgb: np.ndarray) -> str:
    return min(S.COLORS, key=lambda name: float(np.sum((np.asarray(S.COLOR_RGB[name]) - rgb) ** 2)))


def test_boxes_are_the_boxes_of_the_visible_masks(rows):
    for row in rows:
        masks = S.decode_masks(row)
        pixels = np.asarray(row["image"])
        assert masks.shape == (len(row["boxes"]), row["height"], row["width"])
        assert masks.sum(axis=0).max() <= 1, "visible masks of one scene must not overlap"
        for k, (mask, box) in enumerate(zip(masks, row["boxes"])):
            assert mask.sum() >= S.MIN_VISIBLE_PIXELS
            ys, xs = np.nonzero(mask)
            assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert 0 <= box[0] < box[2] <= row["width"] and 0 <= box[1] < box[3] <= row["height"]
            colors = np.unique(pixels[mask], axis=0)
            assert len(colors) == 1, "a visible mask covers exactly the pixels painted with one object colour"
            assert nearest_color(colors[0]) == row["colors"][k]
        background = ~masks.any(axis=0)
        painted = {tuple(c) for c in np.unique(pixels[masks.any(axis=0)], axis=0)}
        assert not painted & {tuple(c) for c in np.unique(pixels[background], axis=0)}
        areas = masks.sum(axis=(1, 2))
        assert row["salient_index"] == int(np.argmax(areas))


def test_scenes_without_masks_keep_everything_else():
    with_masks = S.generate_scenes(2, seed=9, image_size_range=(96, 128))
    without = S.generate_scenes(2, seed=9, image_size_range=(96, 128), with_masks=False)
    assert "masks" not in without.column_names
    assert without.features == S.scene_features(with_masks=False)
    assert with_masks.remove_columns("masks").data.table.equals(without.data.table)
    with pytest.raises(ValueError, match="with_masks=True"):
        S.decode_masks(without[0])


# --- text annotations ------------------------------------------------------------------------------------------------


def test_referring_expressions_resolve_to_exactly_their_object(rows):
    kinds = set()
    for row in rows:
        objects = scene_objects(row)
        boxes = np.asarray(row["boxes"], dtype=np.float64)
        for expression in row["referring_expressions"]:
            kinds.add(expression["kind"])
            for loose in (False, True):
                found = resolve(
                    expression["text"], objects, boxes[:, :2], boxes[:, 2:], RELATIONS_2D, ORDINALS_2D, S.SHAPES, loose
                )
                assert found == [expression["object_index"]], (expression, row["scene_id"], loose)
    assert kinds == {"attribute", "relation", "ordinal"}


def test_vqa_answers_are_correct(rows):
    asked = set()
    for row in rows:
        objects = scene_objects(row)
        for qa in row["vqa"]:
            question, answer = qa["question"], qa["answer"]
            if question == "How many shapes are there?":
                assert answer == str(len(objects))
                asked.add("total")
            elif match := re.fullmatch(r"How many (\w+) shapes are there\?", question):
                assert answer == str(row["colors"].count(match.group(1)))
                asked.add("color count")
            elif match := re.fullmatch(r"How many (\w+)s are there\?", question):
                assert answer == str(row["categories"].count(match.group(1)))
                asked.add("zero count" if answer == "0" else "shape count")
            elif match := re.fullmatch(r"What color is the (.+)\?", question):
                found = matching(objects, parse_description(match.group(1), S.SHAPES))
                assert len(found) == 1 and answer == row["colors"][found[0]]
                asked.add("color")
            elif match := re.fullmatch(r"What shape is the (\w+) object\?", question):
                found = [j for j, color in enumerate(row["colors"]) if color == match.group(1)]
                assert len(found) == 1 and answer == row["categories"][found[0]]
                asked.add("shape")
            else:
                raise AssertionError(f"unexpected question {question!r}")
    assert asked == {"total", "color count", "shape count", "zero count", "color", "shape"}


def test_grounded_captions_ground_every_object_once(rows):
    for row in rows:
        n = len(row["boxes"])
        first_sentence = row["grounded_caption"].split(". ")[0]
        grounded = []
        for phrase, tokens in GROUNDED_PHRASE.findall(first_sentence):
            indices = [int(i) for i in re.findall(r"<r(\d+)>", tokens)]
            assert all(0 <= i < n for i in indices)
            grounded.extend(indices)
            if len(indices) == 1:
                assert phrase == row["region_captions"][indices[0]]
            else:
                count, color, plural = phrase.split()
                assert NUMBER_WORDS.index(count) == len(indices)
                assert {row["colors"][i] for i in indices} == {color}
                assert {row["categories"][i] + "s" for i in indices} == {plural}
        assert sorted(grounded) == list(range(n))
        for _, tokens in GROUNDED_PHRASE.findall(row["grounded_caption"]):
            assert all(0 <= int(i) < n for i in re.findall(r"<r(\d+)>", tokens))
        plain = re.sub(r"<roi>(?:<r\d+>)+</roi>|</?p>", "", row["grounded_caption"])
        assert plain == row["image_caption"]


def test_grounded_chat_and_multi_grounding_point_at_the_right_objects(rows):
    for row in rows:
        objects = scene_objects(row)
        boxes = np.asarray(row["boxes"], dtype=np.float64)
        chat = row["grounded_chat"]
        assert [turn["role"] for turn in chat] == ["user", "assistant"] * (len(chat) // 2)
        assert chat[0]["content"].startswith("[grounding] ")
        assert chat[1]["content"] == row["grounded_caption"]
        for user, assistant in zip(chat[2::2], chat[3::2]):
            answer = [int(i) for i in re.findall(r"<r(\d+)>", assistant["content"])]
            if expression := re.search(r"<p>(.+?)</p>", user["content"]):
                found = resolve(
                    expression.group(1),
                    objects,
                    boxes[:, :2],
                    boxes[:, 2:],
                    RELATIONS_2D,
                    ORDINALS_2D,
                    S.SHAPES,
                    False,
                )
                assert answer == found
            elif region := re.search(r"<roi><r(\d+)></roi>", user["content"]):
                assert assistant["content"] == row["region_captions"][int(region.group(1))]
            else:
                assert any(user["content"] == query["query"] for query in row["multi_grounding"])
        for query in row["multi_grounding"]:
            words = query["query"].rstrip(".").split()
            if (color_index := next((i for i, w in enumerate(words) if w in S.COLORS), None)) is not None:
                expected = [j for j, c in enumerate(row["colors"]) if c == words[color_index]]
            else:
                plural = next(w for w in words if w.endswith("s") and w[:-1] in S.SHAPES)
                expected = [j for j, c in enumerate(row["categories"]) if c == plural[:-1]]
            assert query["object_indices"] == expected, query


def test_ullava_instructions_use_the_answer_formats(rows):
    formats = {
        "res": r"Sure\. Mask: \[SEG\]; Location: \[LOC\]; \[tag\](\w+ \w+)\[/tag\]\.",
        "rec": r"Sure\. Location: \[LOC\]; \[tag\](\w+ \w+)\[/tag\]\.",
        "semantic": r"Sure\. Info: \[SEG\]; Location: \[LOC\]; \[tag\](\w+)\[/tag\]\.",
        "salient": r"Sure\. Mask: \[SEG\]; Location: \[LOC\]; \[tag\](\w+ \w+)\[/tag\]\. "
        r"Explanation: the (\w+ \w+) is the largest shape in the image\.",
    }
    for row in rows:
        tasks = [item["task"] for item in row["ullava_instructions"]]
        assert tasks.count("salient") == 1
        assert tasks.count("semantic") == len(set(row["categories"]))
        for item in row["ullava_instructions"]:
            match = re.fullmatch(formats[item["task"]], item["answer"])
            assert match, item
            indices = item["object_indices"]
            if item["task"] == "semantic":
                assert indices == [j for j, c in enumerate(row["categories"]) if c == match.group(1)]
            else:
                (index,) = indices
                assert match.group(1) == f"{row['colors'][index]} {row['categories'][index]}"
            if item["task"] == "salient":
                assert indices == [row["salient_index"]]
            if item["task"] in ("res", "rec"):
                assert "the the" not in item["instruction"]


def test_concept_targets_are_soft_distributions_peaked_on_the_object(rows):
    for row in rows[:10]:
        targets = np.asarray(row["concept_targets"], dtype=np.float64)
        assert targets.shape == (len(row["boxes"]), len(S.CONCEPT_VOCABULARY))
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-5)
        for k, distribution in enumerate(targets):
            ranked = [S.CONCEPT_VOCABULARY[i] for i in np.argsort(-distribution)]
            assert ranked[:3] == [f"{row['colors'][k]} {row['categories'][k]}", row["categories"][k], row["colors"][k]]
            assert distribution.min() > 0


def text_tokens(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", SPECIAL.sub(" ", text))


def test_vocabulary_words_cover_every_generated_text(rows):
    vocabulary = S.vocabulary_words()
    assert len(vocabulary) == len(set(vocabulary))
    assert not set(vocabulary) & {"<p>", "[SEG]", "SEG", "LOC", "grounding", "tag", "roi", "r0"}
    texts = []
    for row in rows:
        texts += row["region_captions"] + [row["image_caption"], row["grounded_caption"]]
        texts += [e["text"] for e in row["referring_expressions"]]
        texts += [qa["question"] for qa in row["vqa"]] + [qa["answer"] for qa in row["vqa"]]
        texts += [turn["content"] for turn in row["grounded_chat"]]
        texts += [query["query"] for query in row["multi_grounding"]]
        texts += [item["instruction"] for item in row["ullava_instructions"]]
        texts += [item["answer"] for item in row["ullava_instructions"]]
    videos = S.generate_videos(6, num_frames=2, image_size=96, max_objects=3)
    texts += list(videos["caption"]) + sum(videos["object_captions"], [])
    texts += [qa[key] for qas in videos["qa"] for qa in qas for key in ("question", "answer")]
    for with_color in (False, True):
        texts += list(S.generate_point_clouds(12, num_points=64, with_color=with_color)["caption"])
        scenes_3d = S.generate_3d_scenes(8, num_points=256, with_color=with_color)
        texts += list(scenes_3d["caption"]) + sum(scenes_3d["object_captions"], [])
        texts += [e["text"] for expressions in scenes_3d["referring_expressions"] for e in expressions]
    missing = {token for text in texts for token in text_tokens(text)} - set(vocabulary)
    assert not missing
    assert S.split_words("Sure. Mask: [SEG]; [tag]red circle[/tag].") == [
        "Sure",
        ".",
        "Mask",
        ":",
        ";",
        "red",
        "circle",
        ".",
    ]


# --- videos, point clouds, 3D scenes ---------------------------------------------------------------------------------


def test_video_boxes_move_as_the_caption_says():
    videos = S.generate_videos(6, seed=2, num_frames=5, image_size=128, max_objects=2)
    assert videos.features == S.video_features()
    directions = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1)}
    phrases = {"right": "moves to the right", "left": "moves to the left", "up": "moves up", "down": "moves down"}
    for video in videos:
        assert len(video["frames"]) == 5 and all(frame.size == (128, 128) for frame in video["frames"])
        boxes = np.asarray(video["boxes"])  # (frames, objects, 4)
        assert boxes.shape == (5, len(video["categories"]), 4)
        assert (
            (boxes[..., :2] >= 0).all() and (boxes[..., 2:] <= 128).all() and (boxes[..., 2:] > boxes[..., :2]).all()
        )
        for k, motion in enumerate(video["motions"]):
            description = f"{video['sizes'][k]} {video['colors'][k]} {video['categories'][k]}"
            assert f"a {description} {phrases[motion]}" in video["caption"]
            centers = (boxes[:, k, :2] + boxes[:, k, 2:]) / 2
            axis, sign = directions[motion]
            assert (np.diff(centers[:, axis]) * sign > 0).all(), (motion, centers)
            assert np.ptp(centers[:, 1 - axis]) <= 1.0
            for t, frame in enumerate(video["frames"]):
                x1, y1, x2, y2 = boxes[t, k].astype(int)
                crop = np.asarray(frame)[y1:y2, x1:x2].astype(int)
                close = np.abs(crop - np.asarray(S.COLOR_RGB[video["colors"][k]])).max(axis=2) <= S.COLOR_JITTER
                ys, xs = np.nonzero(close)
                assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [0, 0, x2 - x1, y2 - y1]


def canonical_surface_distance(shape: str, p: np.ndarray) -> np.ndarray:
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    radial = np.hypot(x, y)
    if shape == "sphere":
        return np.abs(np.linalg.norm(p, axis=1) - 1)
    if shape == "cube":
        return np.abs(np.abs(p).max(axis=1) - 1)
    if shape == "cylinder":
        side = np.abs(radial - 1) + np.clip(np.abs(z) - 1, 0, None)
        caps = np.abs(np.abs(z) - 1) + np.clip(radial - 1, 0, None)
        return np.minimum(side, caps)
    if shape in ("cone", "pyramid"):
        spread = radial if shape == "cone" else np.maximum(np.abs(x), np.abs(y))
        side = np.abs(spread - (1 - z) / 2) + np.clip(np.abs(z) - 1, 0, None)
        base = np.abs(z + 1) + np.clip(spread - 1, 0, None)
        return np.minimum(side, base)
    if shape == "torus":
        return np.abs(np.hypot(radial - S.TORUS_MAJOR_RADIUS, z) - S.TORUS_MINOR_RADIUS)
    raise AssertionError(shape)


@pytest.mark.parametrize("with_color", [False, True])
def test_point_clouds_lie_on_their_primitive(with_color):
    clouds = S.generate_point_clouds(18, seed=4, num_points=2048, with_color=with_color).with_format("numpy")
    assert clouds.features == S.point_cloud_features(2048, with_color)
    seen = set()
    for cloud in clouds:
        points = cloud["points"]
        assert points.shape == (2048, 6 if with_color else 3) and points.dtype == np.float32
        rotation = cloud["rotation"].astype(np.float64)
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-5)
        canonical = points[:, :3].astype(np.float64) @ rotation / float(cloud["scale"])
        assert canonical_surface_distance(str(cloud["category"]), canonical).max() < 1e-4
        seen.add(str(cloud["category"]))
        words = [str(cloud["size"]), str(cloud["color"]), str(cloud["category"])]
        assert cloud["caption"] == "a " + " ".join(words if with_color else [words[0], words[2]])
        if with_color:
            expected = np.asarray(S.COLOR_RGB[str(cloud["color"])]) / 255
            np.testing.assert_allclose(points[:, 3:], np.broadcast_to(expected, (2048, 3)), atol=1e-6)
    assert len(seen) >= 4


def test_primitive_sampling_is_uniform_by_area():
    points = S._sample_surface("cylinder", 20000, np.random.default_rng(0))
    on_side = np.abs(np.hypot(points[:, 0], points[:, 1]) - 1) < 1e-9
    # The side of a unit-radius, height-2 cylinder is 4*pi of its 6*pi total area.
    assert abs(on_side.mean() - 2 / 3) < 0.015


@pytest.mark.parametrize("with_color", [False, True])
def test_3d_scenes_boxes_points_and_expressions_agree(with_color):
    scenes_3d = S.generate_3d_scenes(12, seed=1, num_points=1024, with_color=with_color).with_format("numpy")
    kinds = set()
    for scene in scenes_3d:
        points, labels, boxes = scene["points"], scene["point_labels"], scene["boxes_3d"].astype(np.float64)
        assert points.shape == (1024, 6 if with_color else 3)
        n = len(scene["categories"])
        assert 2 <= n <= 5 and boxes.shape == (n, 6) and (boxes[:, 3:] > 0).all()
        assert (labels == -1).sum() == 256 and set(np.unique(labels)) == set(range(-1, n))
        np.testing.assert_allclose(points[labels == -1, 2], 0.0, atol=1e-7)
        np.testing.assert_allclose(boxes[:, 2] - boxes[:, 5] / 2, 0.0, atol=1e-5)  # resting on the floor
        mins, maxs = boxes[:, :3] - boxes[:, 3:] / 2, boxes[:, :3] + boxes[:, 3:] / 2
        for k in range(n):
            own = points[labels == k, :3]
            assert (own >= mins[k] - 1e-4).all() and (own <= maxs[k] + 1e-4).all()
            assert ((own.max(axis=0) - own.min(axis=0)) >= 0.85 * boxes[k, 3:]).all(), "box is not tight"
            for j in range(k):
                overlap = (mins[k, :2] < maxs[j, :2]) & (maxs[k, :2] > mins[j, :2])
                assert not overlap.all(), "primitives must not overlap on the floor"
        objects = [
            {"shape": shape, "color": color, "size": size}
            for shape, color, size in zip(scene["categories"], scene["colors"], scene["sizes"])
        ]
        for expression in scene["referring_expressions"]:
            kinds.add(str(expression["kind"]))
            if not with_color:
                assert not set(str(expression["text"]).split()) & set(S.COLORS)
            for loose in (False, True):
                found = resolve(
                    str(expression["text"]),
                    objects,
                    mins[:, :2],
                    maxs[:, :2],
                    RELATIONS_3D,
                    ORDINALS_3D,
                    S.POINT_CLOUD_SHAPES,
                    loose,
                )
                assert found == [int(expression["object_index"])], expression
    assert {"attribute", "relation"} <= kinds


# --- convenience and bad input ---------------------------------------------------------------------------------------


def test_load_synthetic_builds_all_splits():
    splits = S.load_synthetic("point_clouds", num_examples={"train": 3, "test": 2}, num_points=64)
    assert isinstance(splits, datasets.DatasetDict)
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 3, "test": 2}
    assert len(S.generate_scenes(0)) == 0 and S.generate_scenes(0).features == S.scene_features()


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: S.generate_scenes(-1), ValueError, "num_scenes"),
        (lambda: S.generate_scenes(2.5), TypeError, "num_scenes"),
        (lambda: S.generate_scenes(1, split="dev"), ValueError, "split"),
        (lambda: S.generate_scenes(1, seed=-3), ValueError, "seed"),
        (lambda: S.generate_scenes(1, image_size_range=(300, 200)), ValueError, "image_size_range"),
        (lambda: S.generate_scenes(1, image_size_range=(32, 64)), ValueError, "image_size_range"),
        (lambda: S.generate_scenes(1, image_size_range=224), TypeError, "image_size_range"),
        (lambda: S.generate_scenes(1, min_objects=5, max_objects=3), ValueError, "min_objects"),
        (lambda: S.generate_scenes(1, max_objects=40), ValueError, "max_objects"),
        (lambda: S.generate_scenes(1, with_masks="yes"), TypeError, "with_masks"),
        (lambda: S.generate_videos(1, num_frames=1), ValueError, "num_frames"),
        (lambda: S.generate_point_clouds(1, num_points=10), ValueError, "num_points"),
        (lambda: S.generate_3d_scenes(1, floor_fraction=1.5), ValueError, "floor_fraction"),
        (lambda: S.load_synthetic("meshes"), ValueError, "kind"),
        (lambda: S.concept_distribution("blob", "red"), ValueError, "shape"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()
