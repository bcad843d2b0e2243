"""Real-format data loaders (hf_regionmm.data.loaders) on the tiny fixtures of tests/fixtures/<dataset>/."""

import importlib.util
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from hf_regionmm.data.loaders import (
    MalformedRecordWarning,
    UnsafePickleError,
    coco_segmentation_to_rle,
    coco_xywh_to_xyxy,
    decode_coco_rle_string,
    encode_coco_rle_string,
    flickr30k_grounded_caption,
    load_cap3d,
    load_coco_detection,
    load_flickr30k_entities,
    load_refcoco,
    load_refs,
    load_scanrefer,
    load_visual_genome_regions,
    parse_flickr30k_sentence,
    polygons_to_mask,
)
from hf_regionmm.data.synthetic import (
    decode_masks,
    decode_rle,
    encode_rle,
    point_cloud_features,
    scene_3d_features,
    scene_features,
)

FIXTURES = Path(__file__).parent / "fixtures"
COCO = FIXTURES / "coco"
REFCOCO = FIXTURES / "refcoco"
VG = FIXTURES / "visual_genome"
FLICKR = FIXTURES / "flickr30k_entities"
SCANREFER = FIXTURES / "scanrefer"
CAP3D = FIXTURES / "cap3d"
CAP3D_CSV = CAP3D / "Cap3D_automated_Objaverse.csv"


def _coco(**kwargs):
    return load_coco_detection(COCO / "instances_val2017.json", COCO / "val2017", **kwargs)


def _refcoco(refs_path=REFCOCO / "refs(unc).p", **kwargs):
    return load_refcoco(refs_path, REFCOCO / "instances.json", REFCOCO / "images", **kwargs)


def _vg(**kwargs):
    return load_visual_genome_regions(VG / "region_descriptions.json", VG / "images", VG / "image_data.json", **kwargs)


def _flickr(root=FLICKR, **kwargs):
    return load_flickr30k_entities(root / "Annotations", root / "Sentences", root / "images", **kwargs)


def _scanrefer(json_path=SCANREFER / "ScanRefer_filtered_val.json", **kwargs):
    return load_scanrefer(json_path, SCANREFER / "scannet_data", **{"num_points": 64, **kwargs})


def _cap3d(csv_path=CAP3D_CSV, points_dir=CAP3D / "points", **kwargs):
    return load_cap3d(csv_path, points_dir, **{"num_points": 64, **kwargs})


class _RunsShell:
    """Pickles to `os.system(command)`: what a malicious pickle does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# ---------------------------------------------------------------------------------------------------- shared schema

_LOADERS = {
    "coco": (_coco, scene_features(True), {"object_ids", "is_crowd"}),
    "refcoco": (lambda: _refcoco(split="val"), scene_features(True), {"object_ids", "is_crowd"}),
    "visual_genome": (_vg, scene_features(False), {"object_ids"}),
    "flickr30k": (_flickr, scene_features(False), {"object_ids"}),
    "scanrefer": (_scanrefer, scene_3d_features(64), {"object_ids"}),
    "cap3d": (_cap3d, point_cloud_features(64), set()),
}


@pytest.mark.parametrize("name", sorted(_LOADERS))
def test_loader_features_match_the_synthetic_schema(name):
    load, synthetic, extra = _LOADERS[name]
    dataset = load()
    assert len(dataset) > 0
    for column, feature in synthetic.items():
        assert column in dataset.features, column
        assert dataset.features[column] == feature, column
    assert set(dataset.features) - set(synthetic) == extra


@pytest.mark.parametrize("name", ["coco", "refcoco", "visual_genome", "flickr30k"])
def test_2d_loaders_fill_absent_fields_with_empty_values_and_keep_boxes_in_the_image(name):
    for row in _LOADERS[name][0]():
        assert row["colors"] == row["sizes"] == row["concept_targets"] == []
        assert row["vqa"] == row["grounded_chat"] == row["multi_grounding"] == row["ullava_instructions"] == []
        assert row["salient_index"] == -1
        assert len(row["object_ids"]) == len(row["boxes"])
        for column in ("categories", "region_captions"):
            assert row[column] == [] or len(row[column]) == len(row["boxes"]), column
        boxes = np.array(row["boxes"], dtype=np.float32).reshape(-1, 4)
        assert (
            (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= row["width"]).all() and (boxes[:, 3] <= row["height"]).all()
        )
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert row["image"].size == (row["width"], row["height"])


# ---------------------------------------------------------------------------------------------------- COCO geometry


def test_coco_xywh_to_xyxy_by_hand():
    np.testing.assert_array_equal(coco_xywh_to_xyxy([10, 5, 8, 6]), [10, 5, 18, 11])
    np.testing.assert_array_equal(coco_xywh_to_xyxy([[0.5, 1, 2, 3], [4, 4, 0, 1]]), [[0.5, 1, 2.5, 4], [4, 4, 4, 5]])
    with pytest.raises(ValueError, match="`boxes` must have shape"):
        coco_xywh_to_xyxy([1, 2, 3])


def test_polygon_rasteriser_rectangle_covers_the_pixels_between_its_edges():
    mask = polygons_to_mask([[2, 1, 6, 1, 6, 4, 2, 4]], 5, 8)
    expected = np.zeros((5, 8), dtype=bool)
    expected[1:4, 2:6] = True
    np.testing.assert_array_equal(mask, expected)


def test_polygon_rasteriser_triangle_by_hand():
    # Pixel (r, c) is inside when its centre (c + 0.5, r + 0.5) is: c + r + 1 < 4 for this triangle.
    mask = polygons_to_mask([[0, 0, 4, 0, 0, 4]], 4, 4)
    expected = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(mask, expected)


def test_polygon_rasteriser_concave_clipped_and_multi_part():
    l_shape = [0, 0, 4, 0, 4, 2, 2, 2, 2, 4, 0, 4]
    mask = polygons_to_mask([l_shape], 6, 6)
    assert mask.sum() == 12 and mask[:2, :4].all() and mask[2:4, :2].all() and not mask[2:, 2:].any()
    # Half-pixel edges: centres on the left/top edge are inside, on the right/bottom edge outside.
    np.testing.assert_array_equal(
        polygons_to_mask([[0.5, 0.5, 2.5, 0.5, 2.5, 2.5, 0.5, 2.5]], 3, 3),
        np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=bool),
    )
    assert polygons_to_mask([[-2, -2, 3, -2, 3, 3, -2, 3]], 4, 4).sum() == 9
    two = polygons_to_mask([[0, 0, 2, 0, 2, 2, 0, 2], [3, 3, 4, 3, 4, 4, 3, 4]], 4, 4)
    assert two.sum() == 5 and two[3, 3]


@pytest.mark.parametrize(
    ("polygons", "match"),
    [
        ([[0, 0, 1, 1]], r"`polygons\[0\]` must be a flat .* at least 3 vertices"),
        ([[0, 0, 1, 1, 2]], r"`polygons\[0\]`"),
        ([[0, 0, 1, 0, 1, float("nan")]], "non-finite"),
        ("0 0 1 0 1 1", "`polygons` must be a list"),
    ],
)
def test_polygon_rasteriser_rejects_bad_polygons(polygons, match):
    with pytest.raises((ValueError, TypeError), match=match):
        polygons_to_mask(polygons, 4, 4)


def test_compressed_rle_strings_by_hand_and_round_trip():
    # From the 4th run on, runs are stored as differences: 2 - 3 = -1 is the single chunk 31 ('O').
    assert decode_coco_rle_string("537O") == [5, 3, 7, 2]
    assert encode_coco_rle_string([5, 3, 7, 2]) == "537O"
    # 100 = 4 + 3 * 32: chunk 4 with the continuation bit ('T'), then 3.
    assert decode_coco_rle_string("T3") == [100]
    assert encode_coco_rle_string([100]) == "T3"
    rng = np.random.default_rng(0)
    mask = rng.random((23, 17)) < 0.4
    counts = encode_rle(mask)
    assert decode_coco_rle_string(encode_coco_rle_string(counts)) == counts
    segmentation = {"size": [23, 17], "counts": encode_coco_rle_string(counts)}
    np.testing.assert_array_equal(decode_rle(coco_segmentation_to_rle(segmentation, 23, 17), 23, 17), mask)
    with pytest.raises(ValueError, match="truncated"):
        decode_coco_rle_string("T")
    with pytest.raises(ValueError, match="does not match the 17x23"):
        coco_segmentation_to_rle(segmentation, 17, 23)


# ---------------------------------------------------------------------------------------------------- COCO loader


def test_coco_boxes_masks_and_categories():
    dataset = _coco()
    assert dataset["scene_id"] == ["coco/139", "coco/285", "coco/632"]
    first, second, empty = dataset
    assert first["boxes"] == [[10, 5, 18, 11], [24, 14, 40, 26]]
    assert first["categories"] == ["dog", "person"] and first["object_ids"] == ["1001", "1002"]
    assert first["is_crowd"] == [False, False]  # the crowd annotation 1003 is skipped by default
    masks = decode_masks(first)
    rectangle = np.zeros((32, 48), dtype=bool)
    rectangle[5:11, 10:18] = True
    np.testing.assert_array_equal(masks[0], rectangle)
    triangle = masks[1]
    assert not triangle[:14].any() and not triangle[26:].any() and not triangle[:, :24].any()
    assert abs(int(triangle.sum()) - 96) <= 8  # the polygon's area
    # Symmetric about x = 32 (column c mirrors to 63 - c); no pixel centre lies exactly on an edge.
    np.testing.assert_array_equal(triangle[:, 16:48], triangle[:, 16:48][:, ::-1])
    # A two-part polygon and a compressed RLE: their pixel counts equal the annotated areas.
    assert second["boxes"] == [[5, 5, 15, 25], [20, 22, 32, 32]]
    assert decode_masks(second).sum(axis=(1, 2)).tolist() == [170, 120]
    assert empty["boxes"] == [] and empty["masks"] == [] and empty["categories"] == []


def test_coco_crowd_flag_max_images_and_no_masks():
    with_crowd = _coco(include_crowd=True)[0]
    assert with_crowd["is_crowd"] == [False, False, True] and with_crowd["boxes"][2] == [2, 20, 8, 28]
    assert decode_masks(with_crowd)[2].sum() == 48
    assert len(_coco(max_images=1)) == 1
    no_masks = _coco(with_masks=False)
    assert "masks" not in no_masks.features and no_masks[0]["boxes"] == [[10, 5, 18, 11], [24, 14, 40, 26]]


def _edited_coco(tmp_path, edit):
    folder = tmp_path / "coco"
    shutil.copytree(COCO, folder)
    data = json.loads((folder / "instances_val2017.json").read_text())
    edit(data)
    (folder / "instances_val2017.json").write_text(json.dumps(data))
    return folder / "instances_val2017.json", folder / "val2017"


def test_coco_reports_malformed_annotations_and_missing_images_by_id(tmp_path):
    def edit(data):
        data["annotations"][0]["bbox"] = [10, 5, 0, 6]  # zero width, annotation 1001
        data["annotations"][3]["bbox"] = [30, 30, 20, 20]  # past the 40x40 image, annotation 2001
        del data["annotations"][4]["category_id"]  # annotation 2002
        data["images"][2]["file_name"] = "missing.jpg"  # image 632

    instances, images = _edited_coco(tmp_path, edit)
    with pytest.warns(MalformedRecordWarning) as caught:
        dataset = load_coco_detection(instances, images)
    message = str(caught[0].message)
    assert "skipped 4 malformed record(s)" in message
    assert "annotation 1001 (image 139): box [10, 5, 10, 11] (xyxy) has zero area" in message
    assert "annotation 2001 (image 285): box [30, 30, 50, 50] (xyxy) lies outside the 40x40 image" in message
    assert "annotation 2002 (image 285): missing key(s) ['category_id']" in message
    assert "image 632: image file not found" in message
    assert dataset["object_ids"] == [["1002"], []]
    with pytest.raises(ValueError, match=r"annotation 1001 \(image 139\): box .* has zero area"):
        load_coco_detection(instances, images, strict=True)


def test_coco_clips_boxes_overhanging_by_rounding(tmp_path):
    def edit(data):
        data["annotations"][1]["bbox"] = [24, 14, 24.4, 12]  # x2 = 48.4 in a 48 wide image

    instances, images = _edited_coco(tmp_path, edit)
    assert load_coco_detection(instances, images)[0]["boxes"][1] == [24, 14, 48, 26]


def test_coco_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="`instances_path`"):
        load_coco_detection(tmp_path / "nope.json", COCO / "val2017")
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="`instances_path` .* must be a COCO instances JSON"):
        load_coco_detection(tmp_path / "bad.json", COCO / "val2017")
    with pytest.raises(ValueError, match="`max_images`"):
        _coco(max_images=-1)


# ---------------------------------------------------------------------------------------------------- RefCOCO


def test_refcoco_val_split_from_the_public_pickle():
    dataset = _refcoco(split="val")
    assert dataset.split == "val" and len(dataset) == 1
    row = dataset[0]
    assert row["scene_id"] == "refcoco/9"
    # Every annotation of the image (the dog 903 is a distractor), COCO xywh -> xyxy.
    assert row["boxes"] == [[2, 3, 12, 23], [20, 4, 32, 22], [14, 22, 22, 28]]
    assert row["object_ids"] == ["901", "902", "903"] and row["categories"] == ["person", "person", "dog"]
    assert row["referring_expressions"] == [
        {"text": "man on left", "object_index": 0, "kind": "refcoco"},
        {"text": "left guy", "object_index": 0, "kind": "refcoco"},
        {"text": "man on right", "object_index": 1, "kind": "refcoco"},
    ]
    assert row["region_captions"] == ["man on left", "man on right", ""]
    assert decode_masks(row).sum(axis=(1, 2)).tolist() == [200, 216, 48]


def test_refcoco_json_refs_and_other_splits(tmp_path):
    refs = load_refs(REFCOCO / "refs(unc).p")
    assert [ref["ref_id"] for ref in refs] == [0, 1, 2, 3, 4] and refs[0]["sentences"][0]["raw"] == "Man on left"
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    from_json = _refcoco(refs_path=tmp_path / "refs.json", split="testA", dataset="refcoco+")
    from_pickle = _refcoco(split="testA", dataset="refcoco+")
    assert from_json.to_list() == from_pickle.to_list()
    row = from_pickle[0]
    assert row["scene_id"] == "refcoco+/25"
    assert [(e["text"], e["object_index"], e["kind"]) for e in row["referring_expressions"]] == [
        ("dog at the bottom", 1, "refcoco+"),
        ("cat on top", 0, "refcoco+"),
        ("top animal", 0, "refcoco+"),
    ]
    with pytest.raises(ValueError, match=r"`split` 'testB' does not occur .* splits \['testA', 'train', 'val'\]"):
        _refcoco(split="testB")
    with pytest.raises(ValueError, match="`dataset` must be one of"):
        _refcoco(dataset="refcocoo")


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_restricted_unpickler_reads_plain_data_of_any_protocol(tmp_path, protocol):
    data = [{"ref_id": 1, "sentences": [{"sent": "a man", "tokens": ("a", "man")}], "split": "val", "x": {1.5, 2}}]
    (tmp_path / "refs.p").write_bytes(pickle.dumps(data, protocol=protocol))
    assert load_refs(tmp_path / "refs.p") == data


@pytest.mark.parametrize(
    ("payload", "name"), [(_RunsShell, r"(os|posix)\.system"), (None, r"(__builtin__|builtins)\.eval")]
)
def test_restricted_unpickler_refuses_code(tmp_path, payload, name):
    marker = tmp_path / "pwned"
    if payload is None:

        class _Eval:
            def __reduce__(self):
                return (eval, (f"open({str(marker)!r}, 'w')",))

        malicious = [{"ref_id": 0}, _Eval()]
    else:
        malicious = [{"ref_id": 0}, payload(f"touch {marker}")]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(malicious, protocol=2))
    with pytest.raises(UnsafePickleError, match=rf"refusing to unpickle `{name}`"):
        load_refs(tmp_path / "refs(unc).p")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_refcoco(tmp_path / "refs(unc).p", REFCOCO / "instances.json", REFCOCO / "images")
    assert not marker.exists()


def test_refcoco_reports_bad_refs_by_id(tmp_path):
    refs = load_refs(REFCOCO / "refs(unc).p")
    del refs[1]["sentences"]  # ref 1
    refs[0]["ann_id"] = 999  # ref 0 points at no annotation
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    with pytest.warns(MalformedRecordWarning, match=r"ref 1: missing key\(s\) \['sentences'\]") as caught:
        dataset = _refcoco(refs_path=tmp_path / "refs.json", split="val")
    assert "ref 0: annotation 999 is missing" in str(caught[0].message)
    assert len(dataset) == 0
    with pytest.raises(ValueError, match="ref 1: missing key"):
        _refcoco(refs_path=tmp_path / "refs.json", split="val", strict=True)


# ---------------------------------------------------------------------------------------------------- Visual Genome


def test_visual_genome_regions():
    dataset = _vg()
    assert dataset["scene_id"] == ["vg/1", "vg/10"]
    first = dataset[0]
    assert (first["width"], first["height"]) == (40, 30)
    assert first["boxes"] == [[3, 4, 15, 14], [20, 6, 35, 26]]
    assert first["region_captions"] == ["the clock is green in colour", "shade is along the street"]
    assert first["object_ids"] == ["1382", "1383"] and first["categories"] == []
    assert first["image"].size == (40, 30)
    # Without image_data.json the images are found in VG_100K / VG_100K_2 and sized from their headers.
    plain = load_visual_genome_regions(VG / "region_descriptions.json", VG / "images")
    assert plain.remove_columns("image").to_list() == dataset.remove_columns("image").to_list()
    assert len(_vg(max_images=1)) == 1


def test_visual_genome_reports_bad_regions_by_id(tmp_path):
    data = json.loads((VG / "region_descriptions.json").read_text())
    data[0]["regions"][0]["x"] = 35  # 35 + 12 > 40 + 1
    data[1]["regions"][1]["height"] = 0
    path = tmp_path / "region_descriptions.json"
    path.write_text(json.dumps(data))
    with pytest.warns(MalformedRecordWarning, match=r"region 1382 \(image 1\): box .* lies outside the 40x30 image"):
        dataset = load_visual_genome_regions(path, VG / "images", VG / "image_data.json")
    assert dataset["object_ids"] == [["1383"], ["5001"]]
    with pytest.raises(ValueError, match=r"region 1382 \(image 1\)"):
        load_visual_genome_regions(path, VG / "images", VG / "image_data.json", strict=True)


# ---------------------------------------------------------------------------------------------------- Flickr30k


def test_flickr30k_sentence_parser_on_a_hand_written_line():
    line = "[/EN#18/people A man] in [/EN#19/clothing a blue shirt] sits in [/EN#20/other/scene the park] .\n"
    plain, phrases = parse_flickr30k_sentence(line)
    assert plain == "A man in a blue shirt sits in the park ."
    assert [(p.text, p.phrase_id, p.phrase_types) for p in phrases] == [
        ("A man", "18", ("people",)),
        ("a blue shirt", "19", ("clothing",)),
        ("the park", "20", ("other", "scene")),
    ]
    assert [plain[p.start : p.end] for p in phrases] == ["A man", "a blue shirt", "the park"]
    grounded, boxes = flickr30k_grounded_caption(plain, phrases, {"18": [4], "19": [2, 7]})
    assert grounded == "<p>A man</p><roi><r0></roi> in <p>a blue shirt</p><roi><r1><r2></roi> sits in the park ."
    assert boxes == [4, 2, 7]
    assert parse_flickr30k_sentence("No phrases here .") == ("No phrases here .", [])
    with pytest.raises(ValueError, match="malformed phrase annotation"):
        parse_flickr30k_sentence("[/EN#18/people A man in a shirt .")
    with pytest.raises(ValueError, match="malformed phrase annotation"):
        parse_flickr30k_sentence("[EN#18 people A man] walks .")


def test_flickr30k_grounded_captions_and_voc_boxes():
    dataset = _flickr()
    assert dataset["scene_id"] == [
        "flickr30k/1000092795/0",
        "flickr30k/1000092795/1",
        "flickr30k/1000092795/2",
        "flickr30k/10002456/0",
    ]
    first = dataset[0]
    assert first["grounded_caption"] == (
        "<p>Two young men</p><roi><r0><r1></roi> in <p>a red shirt</p><roi><r2></roi> stand near "
        "<p>a bench</p><roi><r3></roi> ."
    )
    assert first["image_caption"] == "Two young men in a red shirt stand near a bench ."
    # 1-based inclusive VOC (3, 5, 14, 30) -> pixel-edge xyxy (2, 4, 14, 30).
    assert first["boxes"] == [[2, 4, 14, 30], [15, 5, 27, 32], [3, 7, 13, 16], [29, 19, 46, 34]]
    assert first["categories"] == ["people", "people", "clothing", "other"]
    assert first["object_ids"] == ["18", "18", "19", "20/21"]
    assert first["referring_expressions"] == [
        {"text": "a red shirt", "object_index": 2, "kind": "phrase"},
        {"text": "a bench", "object_index": 3, "kind": "phrase"},
    ]
    # Phrases without a box (nobndbox, scene, notvisual) stay plain text.
    assert (
        dataset[1]["grounded_caption"]
        == "<p>Two men</p><roi><r0><r1></roi> talk while something happens in the yard ."
    )
    assert dataset[2]["grounded_caption"] == "<p>A wooden seat</p><roi><r0></roi> is next to some people ."
    assert dataset[2]["boxes"] == [[29, 19, 46, 34]] and dataset[2]["region_captions"] == ["A wooden seat"]
    test_split = _flickr(split_file=FLICKR / "test.txt")
    assert test_split["scene_id"] == ["flickr30k/10002456/0"] and test_split[0]["boxes"] == [[0, 0, 32, 32]]


def test_flickr30k_reports_missing_files_and_bad_sentences_by_id(tmp_path):
    root = tmp_path / "flickr"
    shutil.copytree(FLICKR, root)
    (root / "Sentences" / "10002456.txt").unlink()
    with open(root / "Sentences" / "1000092795.txt", "a", encoding="utf-8") as handle:
        handle.write("[/EN#18/people A man walks .\n")
    with pytest.warns(MalformedRecordWarning, match=r"image 10002456: file\(s\) not found") as caught:
        dataset = _flickr(root)
    assert "image 1000092795 sentence 3: `line` has a malformed phrase annotation" in str(caught[0].message)
    assert len(dataset) == 3
    with pytest.raises(ValueError, match="image 1000092795 sentence 3"):
        _flickr(root, strict=True)


# ---------------------------------------------------------------------------------------------------- ScanRefer


def test_scanrefer_scenes_boxes_and_expressions():
    dataset = _scanrefer().with_format("numpy")
    assert list(dataset["scene_id"]) == ["scene0011_00", "scene0025_00"]
    scene = dataset[0]
    stored = np.load(SCANREFER / "scannet_data" / "scene0011_00_aligned_bbox.npy")
    np.testing.assert_array_equal(np.stack(scene["boxes_3d"]), stored[:, :6])
    assert scene["categories"].tolist() == ["office chair", "desk", "cabinet"]  # the cabinet is NYU40 label 3
    assert scene["object_ids"].tolist() == ["2", "5", "7"]
    assert [(e["text"], e["object_index"]) for e in scene["referring_expressions"]] == [
        ("this is a black office chair. it is next to the desk.", 0),
        ("the chair closest to the window.", 0),
        ("a brown wooden desk.", 1),
    ]
    assert scene["object_captions"].tolist() == [
        "this is a black office chair. it is next to the desk.",
        "a brown wooden desk.",
        "",
    ]
    assert scene["caption"] == "" and scene["points"].shape == (64, 3)
    # Points are rows of the file; each point labelled k (from _ins_label.npy) lies in box k.
    original = np.load(SCANREFER / "scannet_data" / "scene0011_00_aligned_vert.npy")[:, :3]
    assert (np.abs(scene["points"][:, None, :] - original[None]).max(-1).min(-1) == 0).all()
    labels = scene["point_labels"]
    assert set(labels.tolist()) == {-1, 0, 1, 2}
    for k, box in enumerate(stored):
        inside = scene["points"][labels == k]
        assert (np.abs(inside - box[:3]) <= box[3:6] / 2 + 1e-6).all()
    assert (dataset[1]["point_labels"] == -1).all()  # no instance file for scene0025_00


def test_scanrefer_sampling_is_seeded_and_colours_are_scaled():
    again = _scanrefer()
    assert again.to_list() == _scanrefer().to_list()
    assert again[0]["points"] != _scanrefer(seed=1)[0]["points"]
    assert np.asarray(_scanrefer(num_points=500)[0]["points"]).shape == (500, 3)  # more than the 120 stored
    with pytest.warns(MalformedRecordWarning, match=r"scene scene0025_00: the points have 3 columns \(xyz only\)"):
        colored = _scanrefer(with_color=True).with_format("numpy")
    points = colored[0]["points"]
    original = np.load(SCANREFER / "scannet_data" / "scene0011_00_aligned_vert.npy")
    rows = np.abs(points[:, None, :3] - original[None, :, :3]).max(-1).argmin(-1)
    np.testing.assert_allclose(points[:, 3:], original[rows, 3:] / 255.0, rtol=1e-6)


def test_scanrefer_reports_unknown_objects_and_missing_scenes(tmp_path):
    entries = json.loads((SCANREFER / "ScanRefer_filtered_val.json").read_text())
    entries[3]["object_id"] = "99"
    entries.append({**entries[0], "scene_id": "scene9999_00"})
    path = tmp_path / "ScanRefer_filtered_val.json"
    path.write_text(json.dumps(entries))
    with pytest.warns(MalformedRecordWarning, match="scene0011_00/object 99/ann 0: object 99 has no") as caught:
        dataset = _scanrefer(path)
    assert "scene scene9999_00: no point and box files" in str(caught[0].message)
    assert [len(e) for e in dataset["referring_expressions"]] == [2, 1]
    with pytest.raises(ValueError, match="scene0011_00/object 99/ann 0"):
        _scanrefer(path, strict=True)


# ---------------------------------------------------------------------------------------------------- Cap3D


def test_cap3d_captions_and_points():
    dataset = _cap3d().with_format("numpy")[:]
    uids = ["ed51a51909ee46c780db3a85e821feb2", "9110b606f6c547b2980fcb3c8c4b6a1c", "b8db8dbb6ff447ef9a0e7c6f9a0e4e80"]
    assert dataset["sample_id"].tolist() == uids
    assert dataset["caption"].tolist() == [
        "A green and white rifle, with a black scope.",
        "A wooden chair with four legs.",
        "A small red cube.",
    ]
    assert dataset["category"].tolist() == ["", "", ""] and (dataset["scale"] == 1).all()
    np.testing.assert_array_equal(dataset["rotation"], np.broadcast_to(np.eye(3), (3, 3, 3)))
    stored = [
        np.load(CAP3D / "points" / f"{uids[0]}.npy")[:, :3],
        np.load(CAP3D / "points" / f"{uids[1]}.npz")["arr_0"],
        np.load(CAP3D / "points" / f"{uids[2]}.npy"),  # 40 points, sampled with replacement up to 64
    ]
    for points, original in zip(dataset["points"], stored):
        assert points.shape == (64, 3)
        assert (np.abs(points[:, None] - original[None]).max(-1).min(-1) == 0).all()
    with pytest.warns(MalformedRecordWarning, match="9110b606f6c547b2980fcb3c8c4b6a1c.*xyz only"):
        colored = _cap3d(with_color=True).with_format("numpy")
    rows = np.abs(colored[0]["points"][:, None, :3] - np.load(CAP3D / "points" / f"{uids[0]}.npy")[None, :, :3])
    original = np.load(CAP3D / "points" / f"{uids[0]}.npy")[rows.max(-1).argmin(-1)]
    np.testing.assert_allclose(colored[0]["points"][:, 3:], original[:, 3:])  # already in [0, 1]: not rescaled
    assert len(_cap3d(max_samples=2)) == 2


def test_cap3d_never_unpickles_point_files_and_reports_bad_lines(tmp_path):
    points_dir = tmp_path / "points"
    shutil.copytree(CAP3D / "points", points_dir)
    marker = tmp_path / "pwned"
    np.save(points_dir / "evil.npy", np.array([_RunsShell(f"touch {marker}")], dtype=object), allow_pickle=True)
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text(CAP3D_CSV.read_text() + "evil,an evil object\nmissing,no file\nthree,fields,here\n")
    with pytest.warns(MalformedRecordWarning) as caught:
        dataset = _cap3d(csv_path, points_dir)
    message = str(caught[0].message)
    assert "uid 'evil' (line 4): cannot read evil.npy" in message and "allow_pickle" in message
    assert "uid 'missing' (line 5): no point file" in message
    assert "line 6: has 3 fields; expected uid,caption" in message
    assert len(dataset) == 3 and not marker.exists()
    with pytest.raises(ValueError, match="uid 'evil' \\(line 4\\)"):
        _cap3d(csv_path, points_dir, strict=True)
    with pytest.raises(ValueError, match="`num_points` must be a positive int"):
        _cap3d(num_points=0)


# ---------------------------------------------------------------------------------------------------- fixtures


def test_fixture_generator_reproduces_the_committed_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_fixtures(tmp_path)
    committed = sorted(p.relative_to(FIXTURES) for p in FIXTURES.rglob("*") if p.is_file() and p.suffix != ".py")
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [p for p in committed if "__pycache__" not in p.parts]
    for relative in written:
        if relative.suffix != ".jpg":  # JPEG bytes depend on the Pillow build
            assert (tmp_path / relative).read_bytes() == (FIXTURES / relative).read_bytes(), relative
    assert sum((FIXTURES / p).stat().st_size for p in written) < 300_000
