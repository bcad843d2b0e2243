"""Packaged evaluation metrics: loaded offline by path through ``load_metric`` and checked against hand computations.

Every expected number below is worked out in the comment next to it. The caption metrics' hand values were also
cross-checked against pycocoevalcap 1.2, the detection metrics against pycocotools 2.0.11, and the PTB tokenizer
cases are outputs recorded from Stanford CoreNLP 3.4.1's PTBTokenizer (the jar pycocoevalcap runs).
"""

import ast
import importlib.util
import math
import os
import socket
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_regionmm.evaluation import available_metrics, functional, load_metric
from hf_regionmm.evaluation.functional import (
    box_iou_matrix,
    check_boxes,
    greedy_match,
    mask_to_rle,
    normalize_vqa_answer,
    ptb_tokenize,
    rle_from_string,
    rle_to_mask,
    rle_to_string,
    tokenize_caption,
)

METRICS_DIR = Path(functional.__file__).parent / "metrics"


@pytest.fixture(scope="session", autouse=True)
def offline_hf_home(tmp_path_factory):
    """Offline mode and a throw-away HF_HOME, so loading metrics neither needs the network nor fills the user cache.

    evaluate reads HF_HOME when it is imported, so its cache paths are patched as well. The module cache is left
    alone if another test already imported evaluate's dynamic-module package from the default location (Python
    would keep resolving ``evaluate_modules`` there).
    """
    import evaluate.config

    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(home))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(evaluate.config, "HF_METRICS_CACHE", home / "metrics")
        if "evaluate_modules" not in sys.modules:
            patch.setattr(evaluate.config, "HF_MODULES_CACHE", home / "modules")
        yield home


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a metric tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def metric(name: str, **kwargs):
    return load_metric(name, keep_in_memory=True, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------
def test_available_metrics_lists_every_packaged_folder():
    assert available_metrics() == [
        "as_many_recall",
        "bleu",
        "box_precision",
        "cider_d",
        "detection_ap",
        "mask_iou",
        "meteor",
        "rec_accuracy",
        "rouge_l",
        "vqa_accuracy",
    ]


@pytest.mark.parametrize("name", available_metrics())
def test_every_metric_loads_offline_with_its_card(name):
    loaded = load_metric(name)
    assert loaded.name == name
    assert loaded.description.strip() and loaded.inputs_description.strip() and loaded.citation.strip()


def test_load_metric_rejects_unknown_names():
    with pytest.raises(ValueError, match="packaged metrics"):
        load_metric("accuracy")


def test_metric_files_carry_identical_copies_of_the_shared_helpers():
    # evaluate only copies same-folder siblings of a metric script, so shared helpers are duplicated into each file;
    # this guards the copies against drifting from functional.py.
    def top_level_segments(path: Path) -> dict[str, str]:
        source = path.read_text()
        segments = {}
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef):
                segments[node.name] = ast.get_source_segment(source, node)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        segments[target.id] = ast.get_source_segment(source, node)
        return segments

    canonical = top_level_segments(Path(functional.__file__))
    copies = 0
    for name in available_metrics():
        for helper, segment in top_level_segments(METRICS_DIR / name / f"{name}.py").items():
            if helper in canonical:
                assert segment == canonical[helper], f"{name}.py: `{helper}` differs from functional.py; copy it over"
                copies += 1
    assert copies >= 30


# ---------------------------------------------------------------------------------------------------------------------
# functional: boxes and matching
# ---------------------------------------------------------------------------------------------------------------------
def test_box_iou_matrix_hand_values_and_crowd_rule():
    boxes_a = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], dtype=float)
    boxes_b = np.array([[0, 0, 10, 10], [0, 0, 20, 10]], dtype=float)
    # [5,0,15,10] vs [0,0,10,10]: intersection 5*10=50, union 100+100-50=150 -> 1/3.
    # [0,0,10,10] vs [0,0,20,10]: 100 / 200 = 0.5; [5,0,15,10] vs [0,0,20,10]: 100 / 200 = 0.5.
    np.testing.assert_allclose(box_iou_matrix(boxes_a, boxes_b), [[1.0, 0.5], [1 / 3, 0.5]])
    # Against a crowd box the union is the detection's own area: 100 / 100.
    np.testing.assert_allclose(box_iou_matrix(boxes_a, boxes_b, crowd=np.array([False, True])), [[1, 1], [1 / 3, 1]])
    assert box_iou_matrix(np.zeros((0, 4)), boxes_b).shape == (0, 2)


def test_check_boxes_rejects_bad_boxes_with_actionable_messages():
    with pytest.raises(ValueError, match=r"x2 >= x1 and y2 >= y1; got box 1 = \[5.0, 5.0, 1.0, 9.0\]"):
        check_boxes([[0, 0, 1, 1], [5, 5, 1, 9]], "boxes")
    with pytest.raises(ValueError, match=r"shape \(n, 4\); got shape \(1, 3\)"):
        check_boxes([[0, 0, 1]], "boxes")
    with pytest.raises(ValueError, match="NaN"):
        check_boxes([[0, 0, float("nan"), 1]], "boxes")
    assert check_boxes(torch.tensor([[1, 2, 3, 4]]), "boxes").dtype == np.float64


def test_greedy_match_follows_cocoeval_rules():
    no = np.array([False, False])
    # IoU tie between two ground-truth boxes: COCOeval replaces its running best on >=, so the later one wins.
    assert greedy_match(np.array([[0.6, 0.6]]), no, no, 0.5).tolist() == [1]
    # One-to-one: the second detection cannot take the box the first one took.
    assert greedy_match(np.array([[0.9, 0.0], [0.8, 0.0]]), no, no, 0.5).tolist() == [0, -1]
    # A non-ignored candidate is never traded for an ignored one (ignored ground truth is sorted last).
    assert greedy_match(np.array([[0.55, 0.9]]), np.array([False, True]), no, 0.5).tolist() == [0]
    # Crowd ground truth can absorb several detections; the threshold is inclusive.
    crowd = np.array([True])
    assert greedy_match(np.array([[0.5], [0.8]]), np.array([True]), crowd, 0.5).tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------------------------------
# functional: masks and RLE
# ---------------------------------------------------------------------------------------------------------------------
def test_rle_hand_examples_and_round_trip():
    # Column-major [[0,1],[1,1]] -> 0,1,1,1: one zero then three ones.
    assert mask_to_rle(np.array([[0, 1], [1, 1]])) == {"size": [2, 2], "counts": [1, 3]}
    # A mask starting with a one starts with an empty run of zeros.
    assert mask_to_rle(np.array([[True, False], [False, False]])) == {"size": [2, 2], "counts": [0, 1, 3]}
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((rng.integers(1, 9), rng.integers(1, 9))) < 0.5
        rle = mask_to_rle(torch.from_numpy(mask))
        np.testing.assert_array_equal(rle_to_mask(rle), mask)
        assert rle_from_string(rle_to_string(rle["counts"])) == rle["counts"]
    # pycocotools' string for counts [1, 1, 1, 40]: the 4th count is stored as 40 - 1 = 39 = 0b1_00111, i.e. the
    # 5-bit groups 7 (with the continuation bit 0x20: 39 -> chr(87) 'W') and 1 ('1').
    assert rle_to_string([1, 1, 1, 40]) == "111W1"
    assert rle_from_string("111W1") == [1, 1, 1, 40]


def test_mask_to_rle_rejects_non_binary_masks():
    with pytest.raises(ValueError, match="Threshold logits"):
        mask_to_rle(np.array([[0.2, 0.9]]))
    with pytest.raises(ValueError, match=r"2-D \(height, width\)"):
        mask_to_rle(np.zeros((1, 2, 2), dtype=bool))
    with pytest.raises(ValueError, match="sum to 4"):
        rle_to_mask({"size": [2, 2], "counts": [1, 2]})


# ---------------------------------------------------------------------------------------------------------------------
# functional: caption tokenisation and VQA answers
# ---------------------------------------------------------------------------------------------------------------------
# (input, output of `java edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase` from CoreNLP 3.4.1)
JAVA_PTB_CASES = [
    ("A man's hat (red) is on the table.", "a man 's hat -lrb- red -rrb- is on the table ."),
    ("I don't think they can't; we cannot, won't.", "i do n't think they ca n't ; we can not , wo n't ."),
    (
        "A black-and-white dog -- running fast... \"Hello,\" she said 'hi'.",
        "a black-and-white dog -- running fast ... `` hello , '' she said ` hi ' .",
    ),
    (
        "Mr. Smith paid $3.50 for 1,000 apples at 5 p.m. in the U.S.",
        "mr. smith paid $ 3.50 for 1,000 apples at 5 p.m. in the u.s.",
    ),
    (
        "Two [big] {cats} and/or dogs! Is it? yes: no. e.g. gonna wanna gotta",
        "two -lsb- big -rsb- -lcb- cats -rcb- and/or dogs ! is it ? yes : no . e.g. gon na wan na got ta",
    ),
    (
        "It's 'tis the dog's toy. They're we've I'll he'd I'm y'all",
        "it 's 't is the dog 's toy . they 're we 've i 'll he 'd i 'm y' all",
    ),
    ('He said, "Go!" ... then left.Next sentence', "he said , `` go ! '' ... then left.next sentence"),
    ("there's a dog in the park, isn't there?", "there 's a dog in the park , is n't there ?"),
    ("he's got 2.5 lbs of meat; cost: $5", "he 's got 2.5 lbs of meat ; cost : $ 5"),
    ("wow!!! what?! really??", "wow !!! what ?! really ??"),
    ("the dogs' bowls are empty", "the dogs ' bowls are empty"),
    ("item #5 costs 10% less", "item # 5 costs 10 % less"),
    ("o'clock o'neill rock'n'roll", "o'clock o'neill rock 'n' roll"),
    ("left.right and 3.14 and .5 and 5.", "left.right and 3.14 and .5 and 5 ."),
    (":) smile ;-) wink", ":-rrb- smile ;--rrb- wink"),
    (
        "I don\u2019t know \u201cwhy\u201d it\u2019s here \u2014 really\u2026 ok",
        "i do n't know `` why '' it 's here -- really ... ok",
    ),
    ("l'amour d'accord j'ai the 90's", "l'amour d'accord j' ai the 90 's"),
    ("'tis 'twas gimme lemme more'n d'ye", "'t is 't was gim me lem me more 'n d'ye"),
    ("CANNOT Cannot GONNA Don't WON'T", "can not can not gon na do n't wo n't"),
    ("ab....cd wait.... ok.", "ab ... cd wait ... ok ."),
    ("cost \u00a35 or \u20ac10 or \u00a250 or \u00a53", "cost # 5 or $ 10 or cents 50 or \u00a5 3"),
    ("The U.S.A. is big. So is the U.S.", "the u.s.a. is big . so is the u.s."),
    ("he's 6'2\" tall", "he 's 6 ' 2 '' tall"),
    (
        "A plate topped with meat and vegetables (broccoli, carrots).",
        "a plate topped with meat and vegetables -lrb- broccoli , carrots -rrb- .",
    ),
    (
        'This is an image of a cake with "Happy Birthday" written on it!!',
        "this is an image of a cake with `` happy birthday '' written on it !!",
    ),
    ("a tennis player about to hit the ball w/ his racket", "a tennis player about to hit the ball w / his racket"),
    ("<p>a dog</p> sits on <p>the sofa</p>", "<p> a dog </p> sits on <p> the sofa </p>"),
    ("[LOC] the man on the left [SEG]", "-lsb- loc -rsb- the man on the left -lsb- seg -rsb-"),
    ("two ..", "two . ."),
]


@pytest.mark.parametrize(("text", "java_output"), JAVA_PTB_CASES)
def test_ptb_tokenize_matches_the_stanford_tokenizer(text, java_output):
    assert " ".join(ptb_tokenize(text)) == java_output


def test_tokenize_caption_drops_pycocoevalcap_punctuation_but_keeps_bracket_escapes():
    # pycocoevalcap's list has "-LRB-" in upper case while the tokens are lower-cased, so "-lrb-" survives there.
    assert tokenize_caption('A man\'s hat (red), "big"...') == "a man 's hat -lrb- red -rrb- big"
    assert tokenize_caption("!!!") == "!!!"  # not in the list either: only a single "!" is removed
    assert tokenize_caption(" . , ") == ""


@pytest.mark.parametrize(
    ("answer", "normalized"),
    [
        ("Two", "2"),  # number word -> digit
        ("the dog", "dog"),  # articles dropped
        ("dont", "don't"),  # contraction table
        ("It's a dog!", "it's dog"),  # "!" not touching a space -> replaced by a space, then stripped by split
        ("hello, world", "hello world"),  # ", " touches a space -> deleted
        ("1,000", "1000"),  # digit,digit anywhere -> every mark deleted
        ("3.5", "3.5"),  # a period before a digit stays
        ("e.g.", "eg"),  # other periods go
        ("yes\n", "yes"),
    ],
)
def test_normalize_vqa_answer_follows_the_official_rules(answer, normalized):
    assert normalize_vqa_answer(answer) == normalized


# ---------------------------------------------------------------------------------------------------------------------
# rec_accuracy / box_precision
# ---------------------------------------------------------------------------------------------------------------------
REFERENCE = [0, 0, 10, 10]


def test_rec_accuracy_mixed_case_by_hand():
    predictions = [
        [0, 0, 10, 10],  # IoU 1
        [0, 0, 10, 5],  # IoU 50 / 100 = 0.5 exactly: wrong under Groma's strict >, right with >=
        None,  # no box: IoU 0, wrong
        [5, 0, 15, 10],  # IoU 50 / 150 = 1/3
    ]
    result = metric("rec_accuracy").compute(predictions=predictions, references=[REFERENCE] * 4)
    assert result["accuracy"] == pytest.approx(1 / 4)
    assert result["miou"] == pytest.approx((1 + 0.5 + 0 + 1 / 3) / 4)
    assert result["no_box_rate"] == pytest.approx(1 / 4)
    assert result["num_samples"] == 4
    inclusive = metric("rec_accuracy").compute(predictions=predictions, references=[REFERENCE] * 4, inclusive=True)
    assert inclusive["accuracy"] == pytest.approx(2 / 4)
    # A lower threshold lets the 1/3 box count too.
    low = metric("rec_accuracy").compute(predictions=predictions, references=[REFERENCE] * 4, iou_threshold=0.3)
    assert low["accuracy"] == pytest.approx(3 / 4)


def test_rec_accuracy_edge_cases():
    perfect = metric("rec_accuracy").compute(
        predictions=[REFERENCE, [1, 2, 3, 4]], references=[REFERENCE, [1, 2, 3, 4]]
    )
    assert perfect == {"accuracy": 1.0, "miou": 1.0, "no_box_rate": 0.0, "num_samples": 2}
    nothing = metric("rec_accuracy").compute(predictions=[None, []], references=[REFERENCE, REFERENCE])
    assert nothing == {"accuracy": 0.0, "miou": 0.0, "no_box_rate": 1.0, "num_samples": 2}
    with pytest.raises(ValueError, match=r"`predictions\[0\]` must have x2 >= x1"):
        metric("rec_accuracy").compute(predictions=[[10, 0, 0, 10]], references=[REFERENCE])
    with pytest.raises(ValueError, match=r"`references\[0\]` must be one \[x1, y1, x2, y2\] box"):
        metric("rec_accuracy").compute(predictions=[REFERENCE], references=[[]])
    with pytest.raises(ValueError, match="is empty"):
        metric("rec_accuracy").compute(predictions=[], references=[])


def test_box_precision_several_thresholds():
    predictions = [[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 8], None]  # IoU 1, 0.5, 0.8, missing
    result = metric("box_precision").compute(
        predictions=predictions, references=[REFERENCE] * 4, iou_thresholds=(0.5, 0.75, 0.9)
    )
    # >= 0.5: 1, 0.5, 0.8 -> 3/4; >= 0.75: 1, 0.8 -> 2/4; >= 0.9: 1 -> 1/4.
    assert result == {"precision@0.5": 0.75, "precision@0.75": 0.5, "precision@0.9": 0.25, "num_samples": 4}
    strict = metric("box_precision").compute(predictions=predictions, references=[REFERENCE] * 4, inclusive=False)
    assert strict["precision@0.5"] == 0.5
    with pytest.raises(ValueError, match="iou_thresholds"):
        metric("box_precision").compute(predictions=predictions, references=[REFERENCE] * 4, iou_thresholds=(1.5,))


# ---------------------------------------------------------------------------------------------------------------------
# as_many_recall
# ---------------------------------------------------------------------------------------------------------------------
# Query A (category 1): two small ground-truth boxes; predictions in model order: p1 hits g2 (IoU 1), p2 overlaps g1
# with IoU 68/100 = 0.68, p3 would hit g1 exactly but AS-MANY keeps only k = 2 predictions.
# Query B (category 1): one large box (100x100 = 10000 >= 96^2), nothing predicted.
# Query C (category 2): no ground truth, one prediction: contributes nothing.
QUERY_PREDICTIONS = [[[20, 0, 30, 10], [0, 0, 10, 6.8], [0, 0, 10, 10]], [], [[0, 0, 5, 5]]]
QUERY_BOXES = [[[0, 0, 10, 10], [20, 0, 30, 10]], [[0, 0, 100, 100]], []]


def test_as_many_recall_pools_recall_per_category_by_hand():
    references = [{"boxes": boxes, "category_id": category} for boxes, category in zip(QUERY_BOXES, [1, 1, 2])]
    result = metric("as_many_recall").compute(predictions=QUERY_PREDICTIONS, references=references)
    # Category 1 pools 3 ground-truth boxes. At the 4 thresholds 0.50..0.65 both g1 and g2 are found (2/3), at the
    # 6 thresholds 0.70..0.95 only g2 (1/3): AR = (4 * 2/3 + 6 * 1/3) / 10 = 7/15. Category 2 has no ground truth.
    assert result["ar"] == pytest.approx(7 / 15)
    assert result["ar_50"] == pytest.approx(2 / 3)
    assert result["ar_75"] == pytest.approx(1 / 3)
    # Small boxes g1, g2: (4 * 1 + 6 * 1/2) / 10 = 0.7; the large box is never found; no medium box -> -1.
    assert result["ar_small"] == pytest.approx(0.7)
    assert result["ar_large"] == 0.0
    assert result["ar_medium"] == -1.0
    assert (result["num_queries"], result["num_ground_truth"]) == (3, 3)


def test_as_many_recall_plain_boxes_average_queries_and_max_detections():
    plain = metric("as_many_recall").compute(predictions=QUERY_PREDICTIONS, references=QUERY_BOXES)
    # Each query is its own category: A = (4 * 1 + 6 * 0.5) / 10 = 0.7, B = 0, C has no ground truth -> 0.35.
    assert plain["ar"] == pytest.approx(0.35)
    capped = metric("as_many_recall").compute(predictions=QUERY_PREDICTIONS, references=QUERY_BOXES, max_detections=3)
    # Keeping p3 too: above 0.68 p2 misses and p3 takes g1, so A recalls both boxes at every threshold -> (1 + 0) / 2.
    assert capped["ar"] == pytest.approx(0.5)
    # Areas given explicitly move g1/g2 to "medium" (LVIS passes mask areas this way).
    with_areas = [{"boxes": QUERY_BOXES[0], "category_id": 1, "areas": [2000.0, 2000.0]}]
    moved = metric("as_many_recall").compute(predictions=QUERY_PREDICTIONS[:1], references=with_areas)
    assert moved["ar_medium"] == pytest.approx(0.7) and moved["ar_small"] == -1.0


def test_as_many_recall_edge_cases():
    perfect = metric("as_many_recall").compute(predictions=[QUERY_BOXES[0]], references=[QUERY_BOXES[0]])
    assert perfect["ar"] == 1.0 and perfect["ar_75"] == 1.0
    empty = metric("as_many_recall").compute(predictions=[[[0, 0, 1, 1]]], references=[[]])
    assert empty["ar"] == -1.0 and empty["num_ground_truth"] == 0
    with pytest.raises(ValueError, match="max_detections"):
        metric("as_many_recall").compute(predictions=[[]], references=[QUERY_BOXES[0]], max_detections=0)


# ---------------------------------------------------------------------------------------------------------------------
# mask_iou
# ---------------------------------------------------------------------------------------------------------------------
MASK_PREDICTIONS = [np.array([[1, 1, 0], [0, 0, 0]]), np.zeros((2, 2), bool), np.zeros((2, 2), bool)]
MASK_REFERENCES = [np.array([[1, 0, 0], [1, 0, 0]]), np.zeros((2, 2), bool), np.ones((2, 2), bool)]


def test_mask_iou_mixed_case_by_hand():
    result = metric("mask_iou").compute(predictions=MASK_PREDICTIONS, references=MASK_REFERENCES)
    # Sample IoUs: 1 / 3 (one shared pixel, three in the union), empty/empty = 1, empty vs four pixels = 0.
    # cIoU = (1 + 0 + 0) / (3 + 0 + 4) = 1/7; gIoU = (1/3 + 1 + 0) / 3 = 4/9.
    assert result["ciou"] == pytest.approx(1 / 7)
    assert result["giou"] == pytest.approx(4 / 9)
    assert result["num_samples"] == 3


def test_mask_iou_accumulates_batches_rle_and_tensors_in_the_file_cache(tmp_path):
    accumulating = load_metric("mask_iou", cache_dir=str(tmp_path))  # default, file-backed storage
    accumulating.add_batch(predictions=[torch.from_numpy(MASK_PREDICTIONS[0])], references=[MASK_REFERENCES[0]])
    accumulating.add(prediction=mask_to_rle(MASK_PREDICTIONS[1]), reference=MASK_REFERENCES[1])
    compressed = {"size": [2, 2], "counts": rle_to_string(mask_to_rle(MASK_REFERENCES[2])["counts"])}
    result = accumulating.compute(predictions=[MASK_PREDICTIONS[2]], references=[compressed])
    assert result["ciou"] == pytest.approx(1 / 7) and result["giou"] == pytest.approx(4 / 9)


def test_mask_iou_edge_cases():
    perfect = metric("mask_iou").compute(predictions=MASK_REFERENCES, references=MASK_REFERENCES)
    assert perfect["ciou"] == 1.0 and perfect["giou"] == 1.0
    all_empty = metric("mask_iou").compute(predictions=[np.zeros((3, 3))], references=[np.zeros((3, 3))])
    assert all_empty == {"ciou": 1.0, "giou": 1.0, "num_samples": 1}
    with pytest.raises(ValueError, match="resize the predicted mask"):
        metric("mask_iou").compute(predictions=[np.zeros((2, 3))], references=[np.zeros((3, 2))])
    with pytest.raises(ValueError, match="Threshold logits"):
        metric("mask_iou").compute(predictions=[np.full((2, 2), 0.7)], references=[np.ones((2, 2))])


# ---------------------------------------------------------------------------------------------------------------------
# Captioning: bleu, cider_d, rouge_l, meteor
# ---------------------------------------------------------------------------------------------------------------------
def test_bleu_tiny_corpus_by_hand():
    result = metric("bleu").compute(
        predictions=["The cat sat.", "A dog!"], references=[["the cat sat down"], ["A dog barks.", "The dog."]]
    )
    # Tokenised: "the cat sat" vs "the cat sat down"; "a dog" vs "a dog barks" / "the dog".
    # Clipped matches / hypothesis n-grams over the corpus: 1-grams 5/5, 2-grams 3/3, 3-grams 1/1, 4-grams 0/0,
    # which the COCO tool turns into (0 + 1e-15) / (0 + 1e-9) = 1e-6.
    # Closest reference lengths: 4 (for 3 words) and 2 (for 2 words; "the dog" beats "a dog barks"), so r = 6,
    # c = 5 and the brevity penalty is exp(1 - 6/5).
    penalty = math.exp(-0.2)
    assert result["bleu_1"] == pytest.approx(penalty, rel=1e-8)
    assert result["bleu_2"] == pytest.approx(penalty, rel=1e-8)
    assert result["bleu_3"] == pytest.approx(penalty, rel=1e-8)
    assert result["bleu_4"] == pytest.approx(1e-6**0.25 * penalty, rel=1e-8)
    assert (result["hypothesis_length"], result["reference_length"]) == (5, 6)


def test_bleu_edge_cases():
    perfect = metric("bleu").compute(predictions=["a man rides a horse"], references=["A man rides a horse."])
    assert perfect["bleu_4"] == pytest.approx(1.0)
    empty_hypothesis = metric("bleu").compute(predictions=[""], references=[["a dog"]])
    assert empty_hypothesis["bleu_1"] < 1e-6
    with pytest.raises(ValueError, match=r"`references\[0\]` is empty"):
        metric("bleu").compute(predictions=["a dog"], references=[[]])


def test_cider_d_clipping_and_bigram_length_penalty_by_hand():
    result = metric("cider_d").compute(predictions=["dog dog", "cat"], references=[["dog"], ["bird"]])
    # Two samples: IDF = log 2 - log(df), and every n-gram here has df <= 1, so each weight is tf * log 2 = tf * l.
    # Sample 1, unigrams: hyp {dog: 2l}, ref {dog: l}; clipped dot product min(2l, l) * l = l^2, norms 2l and l
    # -> 0.5 (1.0 without the clipping). Higher orders: the reference has no bigram -> 0.
    # Length penalty on the bigram counts 1 vs 0: exp(-1 / (2 * 6^2)). Score = 10 * (0.5 * penalty) / 4.
    # Sample 2 shares nothing -> 0.
    sample_1 = 10 * 0.5 * math.exp(-1 / 72) / 4
    assert result["scores"] == pytest.approx([sample_1, 0.0])
    assert result["cider_d"] == pytest.approx(sample_1 / 2)


def test_cider_d_edge_cases():
    perfect = metric("cider_d").compute(predictions=["a dog", "a cat"], references=[["a dog"], ["a cat"]])
    # "a" is in every sample's references (IDF 0); "dog"/"cat" and the bigrams match exactly (cosine 1): orders 1-2
    # give 1, orders 3-4 have no n-grams -> 10 * 2/4 = 5.
    assert perfect["scores"] == pytest.approx([5.0, 5.0])
    # A single-sample corpus has IDF log(1) - log(1) = 0 for every reference n-gram: CIDEr-D is 0 by construction.
    assert metric("cider_d").compute(predictions=["a dog"], references=[["a dog"]])["cider_d"] == 0.0


def test_rouge_l_maximises_precision_and_recall_separately():
    result = metric("rouge_l").compute(
        predictions=["Man rides red horse.", "a dog runs"],
        references=[["man rides", "man rides red horse on beach today now"], ["A dog."]],
    )
    # Sample 1: LCS 2 with ref 1 (P = 2/4, R = 1) and 4 with ref 2 (P = 1, R = 4/8); max P = 1, max R = 1 -> F = 1.
    # Sample 2: LCS 2, P = 2/3, R = 1: F = (1 + 1.44) * 2/3 / (1 + 1.44 * 2/3) = 1.62667 / 1.96.
    expected_2 = 2.44 * (2 / 3) / (1 + 1.44 * 2 / 3)
    assert result["scores"] == pytest.approx([1.0, expected_2])
    assert result["rouge_l"] == pytest.approx((1 + expected_2) / 2)
    nothing = metric("rouge_l").compute(predictions=["zebra"], references=[["a dog"]])
    assert nothing["rouge_l"] == 0.0


def test_caption_metrics_accept_pre_tokenised_text():
    # With tokenize=False nothing is lower-cased: "Dog" and "dog" differ.
    raw = metric("bleu").compute(predictions=["Dog"], references=[["dog"]], tokenize=False)
    assert raw["bleu_1"] < 1e-6
    assert metric("bleu").compute(predictions=["Dog"], references=[["dog"]])["bleu_1"] == pytest.approx(1.0)


def test_meteor_explains_what_it_needs(monkeypatch):
    meteor = metric("meteor")
    module = sys.modules[type(meteor).__module__]
    monkeypatch.setattr(module.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="METEOR needs a Java runtime"):
        meteor.compute(predictions=["a dog"], references=[["a dog"]])
    monkeypatch.undo()
    monkeypatch.setattr(module.shutil, "which", lambda name: "/usr/bin/java")
    with pytest.raises(RuntimeError, match="not a file"):
        meteor.compute(predictions=["a dog"], references=[["a dog"]], meteor_jar="/nonexistent/meteor-1.5.jar")
    monkeypatch.delenv("METEOR_JAR", raising=False)
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install pycocoevalcap"):
        meteor.compute(predictions=["a dog"], references=[["a dog"]])


FAKE_JAVA = """#!{python}
# Stands in for `java -jar meteor-1.5.jar`: speaks METEOR's stdio protocol with a toy statistic
# (hypothesis tokens found in any reference, hypothesis length).
import sys
assert sys.argv[1:3] == ["-jar", "-Xmx2G"] and sys.argv[4:] == ["-", "-", "-stdio", "-l", "en", "-norm"], sys.argv
for line in sys.stdin:
    fields = line.rstrip("\\n").split(" ||| ")
    if fields[0] == "SCORE":
        reference_words = " ".join(fields[1:-1]).split()
        hypothesis = fields[-1].split()
        print(sum(word in reference_words for word in hypothesis), len(hypothesis), flush=True)
    elif fields[0] == "EVAL":
        stats = [[int(value) for value in field.split()] for field in fields[1:]]
        for hits, length in stats:
            print(hits / length, flush=True)
        print(sum(hits for hits, _ in stats) / sum(length for _, length in stats), flush=True)
"""


def test_meteor_drives_the_jar_protocol(tmp_path, monkeypatch):
    java = tmp_path / "java"
    java.write_text(FAKE_JAVA.format(python=sys.executable))
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    jar = tmp_path / "meteor-1.5.jar"
    jar.write_text("")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    result = metric("meteor").compute(
        predictions=["A dog, running.", "two cats"],
        references=[["a dog runs"], ["Two cats sleep.", "cats"]],
        meteor_jar=str(jar),
    )
    # Tokenised "a dog running" has 2 of 3 words in "a dog runs"; "two cats" 2 of 2; the toy corpus score is 4/5.
    assert result["scores"] == pytest.approx([2 / 3, 1.0])
    assert result["meteor"] == pytest.approx(0.8)
    assert result["mean_sample_score"] == pytest.approx(5 / 6)


# ---------------------------------------------------------------------------------------------------------------------
# vqa_accuracy
# ---------------------------------------------------------------------------------------------------------------------
def test_vqa_accuracy_by_hand():
    result = metric("vqa_accuracy").compute(
        predictions=["Yes.", "the two dogs", "blue"],
        references=[
            ["yes", "yes"] + ["no"] * 8,
            ["2 dogs", "two dogs", "dogs", "dogs", "dogs", "dogs", "dogs", "dogs", "dogs", "dogs"],
            ["blue"] * 4 + ["navy"] * 6,
        ],
    )
    # Q1: "yes" from 2 humans. Leaving out one of them: 1 match -> 1/3 (twice); leaving out a "no": 2 matches -> 2/3
    # (8 times): (2/3 + 16/3) / 10 = 0.6. Q2: "the two dogs" -> "2 dogs", as "two dogs" -> 2 matches -> 0.6 again.
    # Q3: 4 matches: any subset of 9 keeps >= 3 -> 1.
    assert result["scores"] == pytest.approx([0.6, 0.6, 1.0])
    assert result["accuracy"] == pytest.approx(2.2 / 3)
    # With exactly 3 matching humans out of 10: 3 subsets keep 2 (2/3), 7 keep 3 (1) -> (2 + 7) / 10 = 0.9.
    three = metric("vqa_accuracy").compute(predictions=["red"], references=[["red"] * 3 + ["pink"] * 7])
    assert three["accuracy"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="at least 2 human answers"):
        metric("vqa_accuracy").compute(predictions=["red"], references=[["red"]])


# ---------------------------------------------------------------------------------------------------------------------
# detection_ap
# ---------------------------------------------------------------------------------------------------------------------
# One image, one category. Ground truth g1 = [10,10,14,14] and g2 = [0,0,8,8] (both "small": 16 and 64 px^2).
# Detections by score: d1 = g1 exactly (0.9), d2 far from everything (0.8), d3 = [0,0,8,5] with IoU 40/64 = 0.625
# against g2 (0.7).
# IoU thresholds 0.50, 0.55, 0.60 (d3 matches): TP, FP, TP -> recall .5 .5 1, precision 1 .5 .667, made
# non-increasing: 1 .667 .667. The 101 recall points 0..0.50 read 1 (51 points), 0.51..1 read 2/3 (50 points):
# AP = (51 + 100/3) / 101 = 253/303.
# Thresholds 0.65..0.95 (7): TP, FP, FP -> recall stays .5; points 0..0.50 read 1, the rest 0: AP = 51/101.
# mAP = (3 * 253/303 + 7 * 51/101) / 10 = 610/1010; AR@100 = (3 * 1 + 7 * 0.5) / 10 = 0.65; AR@1 (d1 only) = 0.5.
HAND_GT = {"boxes": [[10, 10, 14, 14], [0, 0, 8, 8]], "labels": [1, 1]}
HAND_DETECTIONS = {
    "boxes": [[10, 10, 14, 14], [20, 20, 24, 24], [0, 0, 8, 5]],
    "scores": [0.9, 0.8, 0.7],
    "labels": [1] * 3,
}
HAND_EXPECTED = {
    "map": 610 / 1010,
    "map_50": 253 / 303,
    "map_75": 51 / 101,
    "map_small": 610 / 1010,
    "map_medium": -1.0,
    "map_large": -1.0,
    "mar_1": 0.5,
    "mar_10": 0.65,
    "mar_100": 0.65,
    "mar_small": 0.65,
    "mar_medium": -1.0,
    "mar_large": -1.0,
    "num_images": 1,
}


def box_masks(boxes, size=(24, 24)) -> np.ndarray:
    masks = np.zeros((len(boxes), *size), dtype=bool)
    for index, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, dtype=int)):
        masks[index, y1:y2, x1:x2] = True
    return masks


def test_detection_ap_box_hand_case():
    result = metric("detection_ap").compute(predictions=[HAND_DETECTIONS], references=[HAND_GT])
    assert result == pytest.approx(HAND_EXPECTED)


def test_detection_ap_masks_of_boxes_score_like_the_boxes():
    # Filled integer boxes have mask IoU equal to box IoU and mask area equal to box area.
    predictions = [{"masks": torch.from_numpy(box_masks(HAND_DETECTIONS["boxes"])), **HAND_DETECTIONS}]
    references = [{"masks": list(box_masks(HAND_GT["boxes"])), **HAND_GT}]
    result = metric("detection_ap", config_name="segm").compute(predictions=predictions, references=references)
    assert result == pytest.approx(HAND_EXPECTED)


def test_detection_ap_crowd_regions_neither_reward_nor_penalise():
    predictions = [{"boxes": [[10, 10, 20, 20], [200, 200, 210, 210]], "scores": [0.9, 0.5], "labels": [2, 2]}]
    references = [{"boxes": [[0, 0, 100, 100], [200, 200, 210, 210]], "labels": [2, 2], "iscrowd": [1, 0]}]
    # The first detection lies inside the crowd region (IoU = 100 / its own area 100 = 1): matched to ignored ground
    # truth, so it is dropped; the second one is a true positive -> AP 1 (up to COCO's tp / (tp + fp + eps)).
    result = metric("detection_ap").compute(predictions=predictions, references=references)
    assert result["map"] == pytest.approx(1.0)
    without_crowd = [{**references[0], "iscrowd": [0, 0]}]
    assert metric("detection_ap").compute(predictions=predictions, references=without_crowd)["map"] < 1.0


def test_detection_ap_edge_cases():
    empty_predictions = [{"boxes": [], "scores": [], "labels": []}]
    nothing_found = metric("detection_ap").compute(predictions=empty_predictions, references=[HAND_GT])
    assert nothing_found["map"] == 0.0 and nothing_found["mar_100"] == 0.0
    no_ground_truth = metric("detection_ap").compute(
        predictions=[HAND_DETECTIONS], references=[{"boxes": [], "labels": []}]
    )
    assert no_ground_truth["map"] == -1.0 and no_ground_truth["mar_1"] == -1.0
    perfect = metric("detection_ap").compute(
        predictions=[{"boxes": HAND_GT["boxes"], "scores": [0.5, 0.4], "labels": [1, 1]}], references=[HAND_GT]
    )
    assert perfect["map"] == pytest.approx(1.0) and perfect["mar_100"] == 1.0
    with pytest.raises(ValueError, match=r"`predictions\[0\]\['scores'\]` must have one entry per object \(3\)"):
        metric("detection_ap").compute(predictions=[{**HAND_DETECTIONS, "scores": [0.5]}], references=[HAND_GT])
    with pytest.raises(ValueError, match="config_name"):
        load_metric("detection_ap", config_name="keypoints")
    with pytest.raises(ValueError, match=r"are \(3, 2\) but .* are \(2, 3\); resize"):
        metric("detection_ap", config_name="segm").compute(
            predictions=[{"masks": np.ones((1, 3, 2), bool), "scores": [1.0], "labels": [1]}],
            references=[{"masks": np.ones((1, 2, 3), bool), "labels": [1]}],
        )


def test_detection_ap_pycocotools_backend_matches_or_says_how_to_install():
    detection_ap = metric("detection_ap")
    if importlib.util.find_spec("pycocotools") is None:
        with pytest.raises(ImportError, match="pip install pycocotools"):
            detection_ap.compute(predictions=[HAND_DETECTIONS], references=[HAND_GT], backend="pycocotools")
    else:
        result = detection_ap.compute(predictions=[HAND_DETECTIONS], references=[HAND_GT], backend="pycocotools")
        assert result == pytest.approx(HAND_EXPECTED)
