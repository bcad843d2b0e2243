"""Pure functions shared by the packaged evaluation metrics (canonical copies).

Every metric under ``hf_regionmm/evaluation/metrics/<name>/<name>.py`` is a single self-contained file: `evaluate`
copies a local metric script into its module cache and only brings along siblings of the *same folder* that the
script imports as ``from .sibling import x`` (``evaluate.loading.get_imports`` / ``_download_additional_modules``);
``..`` imports and imports of this package are not followed. A metric file therefore carries its own copy of the
helpers it needs. This module holds the canonical copy of each shared helper, is what the library calls directly,
and ``tests/test_metrics.py`` asserts that every copy inside a metric file is source-identical to the one here, so a
fix made here and not in the copies (or the other way round) fails the tests.

Conventions: boxes are absolute pixel ``xyxy`` (``x2 >= x1``, ``y2 >= y1``) in the frame of the original image, IoU
is computed on continuous coordinates (area ``(x2 - x1) * (y2 - y1)``, no ``+1`` pixel convention, as in
pycocotools), masks are ``(height, width)`` binary arrays and RLE is the COCO uncompressed form
``{"size": [height, width], "counts": [...]}`` over the column-major (Fortran) flattening, starting with a run of
zeros.
"""

import re
from collections.abc import Sequence

import numpy as np


# --------------------------------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------------------------------
def check_boxes(boxes: np.typing.ArrayLike | None, name: str) -> np.ndarray:
    """Validate and convert boxes to a float64 array.

    Args:
        boxes: ``(n, 4)`` absolute pixel xyxy boxes (list, numpy array or tensor); ``n`` may be 0.
        name: the argument name used in error messages (e.g. ``"references[3]"``).

    Returns:
        ``(n, 4)`` float64 numpy array, xyxy.

    Raises:
        ValueError: wrong shape, non-finite values, or ``x2 < x1`` / ``y2 < y1``.
    """
    if hasattr(boxes, "detach"):
        boxes = boxes.detach().cpu().numpy()
    array = np.asarray(boxes if boxes is not None else [], dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(
            f"`{name}` must be a list of absolute pixel xyxy boxes with shape (n, 4); got shape {array.shape}. "
            "Pass [[x1, y1, x2, y2], ...]."
        )
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or inf coordinates; got {array.tolist()}. Pass finite pixel boxes.")
    inverted = np.nonzero((array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1]))[0]
    if len(inverted):
        index = int(inverted[0])
        raise ValueError(
            f"`{name}` must have x2 >= x1 and y2 >= y1; got box {index} = {array[index].tolist()}. "
            "Pass absolute pixel xyxy boxes (convert xywh or cxcywh first)."
        )
    return array


def box_iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray, crowd: np.ndarray | None = None) -> np.ndarray:
    """Pairwise IoU between two sets of xyxy boxes, as pycocotools' ``bbIou``.

    Args:
        boxes_a: ``(n, 4)`` float64 xyxy boxes (the detections when ``crowd`` is given).
        boxes_b: ``(m, 4)`` float64 xyxy boxes (the ground truth when ``crowd`` is given).
        crowd: optional ``(m,)`` bool; for a crowd box the union is the area of ``boxes_a[i]`` alone (COCO rule: a
            detection inside a crowd region is not penalised for the rest of the region).

    Returns:
        ``(n, m)`` float64 IoU; 0 where the union is empty (two degenerate boxes).
    """
    if len(boxes_a) == 0 or len(boxes_b) == 0:
        return np.zeros((len(boxes_a), len(boxes_b)), dtype=np.float64)
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]) * (boxes_a[:, 3] - boxes_a[:, 1])
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1])
    width = np.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2]) - np.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    height = np.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3]) - np.maximum(
        boxes_a[:, None, 1], boxes_b[None, :, 1]
    )
    intersection = np.clip(width, 0, None) * np.clip(height, 0, None)
    union = area_a[:, None] + area_b[None, :] - intersection
    if crowd is not None:
        union = np.where(np.asarray(crowd, dtype=bool)[None, :], area_a[:, None], union)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def greedy_match(ious: np.ndarray, gt_ignore: np.ndarray, gt_crowd: np.ndarray, iou_threshold: float) -> np.ndarray:
    """One-to-one matching of score-sorted detections to ground truth, exactly as ``COCOeval.evaluateImg``.

    Each detection, in order, takes the still-unmatched ground truth with the highest IoU ``>= iou_threshold``
    (crowd ground truth can be matched many times). Ground truth must be sorted with the non-ignored boxes first; once
    a detection has a non-ignored candidate it never switches to an ignored one. IoU ties go to the *later* ground
    truth, because COCOeval replaces the running best on ``>=``.

    Args:
        ious: ``(num_detections, num_ground_truth)`` float64, detections sorted by descending score.
        gt_ignore: ``(num_ground_truth,)`` bool, the ignored ground truth last.
        gt_crowd: ``(num_ground_truth,)`` bool.
        iou_threshold: IoU a match needs (inclusive; capped at ``1 - 1e-10`` like COCOeval).

    Returns:
        ``(num_detections,)`` int64: the matched ground-truth index, or -1.
    """
    num_detections, num_ground_truth = ious.shape
    matched_gt = np.full(num_detections, -1, dtype=np.int64)
    gt_taken = np.zeros(num_ground_truth, dtype=bool)
    for detection in range(num_detections):
        best_iou = min(iou_threshold, 1 - 1e-10)
        best = -1
        for gt in range(num_ground_truth):
            if gt_taken[gt] and not gt_crowd[gt]:
                continue
            if best > -1 and not gt_ignore[best] and gt_ignore[gt]:
                break
            if ious[detection, gt] < best_iou:
                continue
            best_iou = ious[detection, gt]
            best = gt
        if best > -1:
            matched_gt[detection] = best
            gt_taken[best] = True
    return matched_gt


# --------------------------------------------------------------------------------------------------------------------
# Masks (COCO RLE)
# --------------------------------------------------------------------------------------------------------------------
def mask_to_rle(mask: np.typing.ArrayLike, name: str = "mask") -> dict:
    """Encode a binary mask as COCO uncompressed RLE.

    Args:
        mask: ``(height, width)`` bool or 0/1 integer array (numpy, tensor or nested list).
        name: the argument name used in error messages.

    Returns:
        ``{"size": [height, width], "counts": [run lengths]}``, column-major, first run counts zeros.

    Raises:
        ValueError: not 2-D, or values other than 0/1 (threshold logits or probabilities first).
    """
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D (height, width) binary mask; got shape {array.shape}.")
    if array.dtype != bool:
        if (
            not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating))
            or not np.isin(array, (0, 1)).all()
        ):
            raise ValueError(
                f"`{name}` must be binary (bool or 0/1); got dtype {array.dtype} with other values. Threshold logits "
                "or probabilities first, e.g. `mask > 0`."
            )
    flat = array.astype(bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    boundaries = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(boundaries).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(array.shape[0]), int(array.shape[1])], "counts": [int(c) for c in counts]}


def rle_to_mask(rle: dict, name: str = "rle") -> np.ndarray:
    """Decode COCO uncompressed RLE (``counts`` a list of ints) to a ``(height, width)`` bool mask.

    Raises:
        ValueError: negative run lengths, or runs that do not add up to ``height * width``.
    """
    height, width = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if (counts < 0).any() or counts.sum() != height * width:
        raise ValueError(
            f"`{name}` is not a valid RLE for size {[height, width]}: counts must be non-negative and sum to "
            f"{height * width}, got sum {int(counts.sum())}. Encode masks with `mask_to_rle`."
        )
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape((height, width), order="F")


def rle_from_string(counts: str) -> list[int]:
    """Decode pycocotools' compressed RLE string (``maskApi.c: rleFrString``) to uncompressed run lengths."""
    result: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            char = ord(counts[position]) - 48
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            position += 1
            shift += 1
            if not more and char & 0x10:
                value |= -1 << (5 * shift)
        # Counts from the fourth on are stored as deltas to the count two places back.
        if len(result) > 2:
            value += result[-2]
        result.append(value)
    return result


def rle_to_string(counts: Sequence[int]) -> str:
    """Encode uncompressed run lengths as pycocotools' compressed RLE string (``maskApi.c: rleToString``)."""
    chars = []
    for index, count in enumerate(counts):
        value = int(count) - (int(counts[index - 2]) if index > 2 else 0)
        more = True
        while more:
            char = value & 0x1F
            value >>= 5
            more = value != -1 if char & 0x10 else value != 0
            if more:
                char |= 0x20
            chars.append(chr(char + 48))
    return "".join(chars)


# --------------------------------------------------------------------------------------------------------------------
# Caption tokenisation (pycocoevalcap's PTBTokenizer, re-implemented without Java)
# --------------------------------------------------------------------------------------------------------------------
# pycocoevalcap's list, verbatim. The bracket entries are upper case while the Stanford tokenizer runs with
# -lowerCase, so "-lrb-" and friends are never removed there; keeping the list as is reproduces that.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_PTB_ABBREVIATIONS = (
    "mr|mrs|ms|messrs|dr|drs|prof|profs|sen|sens|rep|reps|atty|attys|lt|col|gen|gov|govs|adm|rev|maj|sgt|cpl|pvt|capt"
    "|st|ste|ave|pres|lieut|hon|brig|cmdr|comdr|pfc|spc|supt|supts|det|mt|ft|jr|sr|inc|co|corp|ltd|bros|vs|etc|dept"
    "|univ|est|cf|al|jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|mon|tue|tues|wed|thu|thurs|fri"
    "|calif|fla|ariz|colo|conn|mich|minn|penn|tenn|wis"
)  # each checked against the Java tokenizer; "sat.", "sun.", "mass.", "wash.", "thur." are split there
_PTB_CHARACTER_MAP = {
    "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": " -- ", "\u2014": " -- ",
    "\u2026": "...", "\u00a3": "#", "\u20ac": "$", "\u00a2": " cents ", "\u00bd": "1/2", "\u00bc": "1/4",
    "\u00be": "3/4", "\u00a0": " ",
}  # fmt: skip
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PTB_SPLIT_WORDS = {
    "cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"],
    "gimme": ["gim", "me"], "lemme": ["lem", "me"],
}  # fmt: skip
_W = r"[^\W_]"  # a letter or digit, Unicode-aware (\w without the underscore)
_PTB_TOKEN = re.compile(
    rf"""
    (?P<url>https?://\S+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+)
  | (?P<smiley>(?<!\S)[<>]?[:;=][-o*']?[()dpo\\{{@|\[\]](?!{_W}))
  | (?P<tag></?[a-z][a-z0-9]*>)
  | (?P<tis>'t(?=(?:is|was)(?!{_W})))
  | (?P<rock>'n'(?={_W}))
  | (?P<clitic>(?:'(?:s|re|ve|ll|d|m|n)|n't)(?!{_W}))
  | (?P<decade>'\d\d(?:s)?(?!{_W}))
  | (?P<elided>(?<!{_W})[a-hj-xz]'[a-z]{{3,}}(?!{_W})|d'ye(?!{_W}))
  | (?P<letter_apostrophe>(?<!{_W})[a-z]'(?!(?:s|re|ve|ll|d|m|t)(?!{_W}))(?=[a-z]))
  | (?P<abbreviation>(?<!{_W})(?:{_PTB_ABBREVIATIONS})\.(?!{_W})|(?<!{_W})no\.(?=\s*\d))
  | (?P<acronym>(?<!{_W})[a-z](?:\.[a-z])+\.?(?!{_W})|(?<!{_W})[a-z]\.(?!{_W}))
  | (?P<hashtag>(?<!{_W})[#@][a-z]\w*)
  | (?P<fraction>\.\d+)
  | (?P<word_before_nt>{_W}+?(?=n't(?!{_W})))
  | (?P<word>{_W}+(?:(?:[-./]|(?<=\d)[,:](?=\d)){_W}+)*)
  | (?P<ellipsis>\.{{2,}})
  | (?P<dashes>-{{2,}})
  | (?P<exclamation>[?!]+)
  | (?P<quote>["'`])
  | (?P<other>\S)
    """,
    re.VERBOSE,
)


def ptb_tokenize(text: str) -> list[str]:
    """Tokenise like Stanford CoreNLP 3.4.1 ``PTBTokenizer -preserveLines -lowerCase`` (what pycocoevalcap runs).

    Covers what captions contain: clitics (``don't -> do n't``, ``man's -> man 's``), PTB quotes (`````/``''``),
    bracket escapes (``( -> -lrb-``), ellipses, dashes, numbers (``3.5``, ``1,000``, ``3:30``), hyphenated and
    slashed words, acronyms and common abbreviations that keep their period (``u.s.``, ``mr.``), and the PTB word
    splits (``cannot -> can not``, ``gonna -> gon na``). ``tests/test_metrics.py`` pins it against outputs recorded
    from the Java tokenizer, and on random caption-like text it agrees with it once punctuation is removed. Known
    differences are rare constructs: abbreviations not in the list above, and a sentence-final single letter
    (``... blue a.``), whose period the Java lexer splits off or not depending on earlier lines of its input.

    Args:
        text: one caption.

    Returns:
        Lower-cased tokens, punctuation included.
    """
    text = text.replace("\n", " ").replace("\r", " ")
    for source, target in _PTB_CHARACTER_MAP.items():
        text = text.replace(source, target)
    text = text.lower()
    tokens: list[str] = []
    for match in _PTB_TOKEN.finditer(text):
        kind, token = match.lastgroup, match.group()
        if kind == "smiley":
            token = "".join(_PTB_BRACKETS.get(char, char) for char in token)
        elif kind == "word" and token in _PTB_SPLIT_WORDS:
            tokens.extend(_PTB_SPLIT_WORDS[token])
            continue
        elif kind == "ellipsis" and len(token) == 2:
            tokens.extend([".", "."])
            continue
        elif kind == "ellipsis":
            token = "..."
        elif kind == "dashes":
            token = "--"
        elif kind == "quote":
            start = match.start()
            opening = start == 0 or text[start - 1].isspace() or text[start - 1] in "([{`\"'"
            if token == '"':
                token = "``" if opening else "''"
            elif token == "'":
                token = "`" if opening else "'"
        elif kind == "other":
            token = _PTB_BRACKETS.get(token, token)
        tokens.append(token)
    return tokens


def tokenize_caption(text: str) -> str:
    """pycocoevalcap's caption pre-processing: PTB tokens, punctuation tokens dropped, joined by single spaces."""
    return " ".join(token for token in ptb_tokenize(text) if token not in PTB_PUNCTUATION)


# --------------------------------------------------------------------------------------------------------------------
# VQA answers (the official VQA evaluation's normalisation)
# --------------------------------------------------------------------------------------------------------------------
# Table from the official vqaEval.py, verbatim (including its odd entries such as "somebody'd" -> "somebodyd" and the
# capitalised keys that never match lower-cased text).
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
VQA_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
VQA_ARTICLES = ("a", "an", "the")
VQA_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# The official pattern, typo included: "(?!<=\d)" is a look-*ahead* for the text "<=digit", so it never blocks.
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_vqa_answer(answer: str) -> str:
    """Normalise an answer as the official VQA evaluation does (``processPunctuation`` then ``processDigitArticle``).

    Newlines/tabs become spaces and the ends are stripped; each punctuation mark is deleted if it touches a space or
    the text has a digit-comma-digit group, and replaced by a space otherwise; periods not followed by a digit are
    removed; the text is lower-cased and split on whitespace; number words become digits (``two -> 2``); articles are
    dropped; the contraction table restores apostrophes (``dont -> don't``).
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    output = text
    for mark in VQA_PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _VQA_COMMA_STRIP.search(text) is not None:
            output = output.replace(mark, "")
        else:
            output = output.replace(mark, " ")
    # The official code passes re.UNICODE as the *count* argument (so at most 32 periods go); answers never get there.
    output = _VQA_PERIOD_STRIP.sub("", output)
    words = []
    for word in output.lower().split():
        word = VQA_NUMBER_WORDS.get(word, word)
        if word not in VQA_ARTICLES:
            words.append(VQA_CONTRACTIONS.get(word, word))
    return " ".join(words)
