"""Corpus BLEU-1..4 for captions, as the COCO caption evaluation (pycocoevalcap ``Bleu(4)``) computes it.

RegionBLIP (Sec. 4, region captioning tables), Groma (region captioning on RefCOCOg / Visual Genome) and TAP-v2 (VG
region captioning) all report captioning with pycocoevalcap. This is a re-implementation of the same arithmetic:

* captions are PTB-tokenised, lower-cased, and punctuation tokens are removed (pycocoevalcap's PTBTokenizer; here a
  pure-Python re-implementation of Stanford's tokenizer, so no Java is needed), unless ``tokenize=False``;
* n-gram counts of the hypothesis are clipped by the maximum count in any reference;
* BLEU is corpus-level: clipped matches and hypothesis n-grams are summed over the corpus before the geometric mean;
* the brevity penalty uses, per sample, the reference length *closest* to the hypothesis length (ties: the shorter),
  summed over the corpus, and ``exp(1 - r / c)`` applies when the total hypothesis length ``c`` is below ``r``;
* the tool's smoothing constants are kept: each precision is ``(matches + 1e-15) / (guesses + 1e-9)``, so a corpus
  with no matching 4-gram gives a tiny positive BLEU-4 instead of 0.
"""

import re

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
BLEU-1..4 as in the COCO caption evaluation toolkit (pycocoevalcap): PTB tokenisation with punctuation removal,
clipped n-gram precision summed over the corpus, geometric mean, and a corpus brevity penalty built from each
sample's closest reference length.
"""

_CITATION = """\
@inproceedings{papineni2002bleu,
  title={Bleu: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle={ACL},
  year={2002}
}
@article{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and Dollar, Piotr and Zitnick, C Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): one generated caption per sample.
    references (`list` of `list[str]` or `list` of `str`): the reference captions of each sample (at least one).
    tokenize (`bool`, default True): PTB-tokenise and drop punctuation first; pass False for text that is already
        tokenised that way (tokens are then split on whitespace).
Returns:
    bleu_1, bleu_2, bleu_3, bleu_4 (`float` in [0, 1]), hypothesis_length and reference_length (`int`, the corpus
    lengths entering the brevity penalty).
Examples:
    >>> bleu = hf_regionmm.evaluation.load_metric("bleu")
    >>> result = bleu.compute(predictions=["a dog runs ."], references=[["A dog runs.", "A puppy is running."]])
    >>> round(result["bleu_1"], 4), round(result["bleu_4"], 4)  # no 4-gram in a 3-word caption: ~(1e-6) ** 0.25
    (1.0, 0.0316)
"""

_MAX_ORDER = 4
_MATCH_EPSILON = 1e-15
_COUNT_EPSILON = 1e-9


# ---- Helpers copied verbatim from hf_regionmm/evaluation/functional.py (tests/test_metrics.py checks that they
# stay identical; edit both together).
# names: PTB_PUNCTUATION, _PTB_ABBREVIATIONS, _PTB_CHARACTER_MAP, _PTB_BRACKETS, _PTB_SPLIT_WORDS, _W, _PTB_TOKEN, ptb_tokenize, tokenize_caption
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


# ---- End of copied helpers.


def _ngram_counts(words: list[str]) -> dict[tuple[str, ...], int]:
    """Counts of every 1..4-gram of a token list."""
    counts: dict[tuple[str, ...], int] = {}
    for order in range(1, _MAX_ORDER + 1):
        for start in range(len(words) - order + 1):
            ngram = tuple(words[start : start + order])
            counts[ngram] = counts.get(ngram, 0) + 1
    return counts


def corpus_bleu(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """pycocoevalcap BLEU on whitespace-tokenised text.

    Args:
        hypotheses: ``n`` hypothesis strings.
        references: ``n`` lists of reference strings.

    Returns:
        ``bleu_1``..``bleu_4``, ``hypothesis_length``, ``reference_length``.
    """
    matches = np.zeros(_MAX_ORDER)
    guesses = np.zeros(_MAX_ORDER)
    hypothesis_length = 0
    reference_length = 0
    for hypothesis, sample_references in zip(hypotheses, references):
        words = hypothesis.split()
        reference_lengths = []
        max_reference_counts: dict[tuple[str, ...], int] = {}
        for reference in sample_references:
            reference_words = reference.split()
            reference_lengths.append(len(reference_words))
            for ngram, count in _ngram_counts(reference_words).items():
                max_reference_counts[ngram] = max(max_reference_counts.get(ngram, 0), count)
        for ngram, count in _ngram_counts(words).items():
            matches[len(ngram) - 1] += min(max_reference_counts.get(ngram, 0), count)
        guesses += [max(0, len(words) - order + 1) for order in range(1, _MAX_ORDER + 1)]
        hypothesis_length += len(words)
        # "closest" reference length; min over (distance, length) breaks ties towards the shorter reference.
        reference_length += min((abs(length - len(words)), length) for length in reference_lengths)[1]
    precisions = (matches + _MATCH_EPSILON) / (guesses + _COUNT_EPSILON)
    scores = np.cumprod(precisions) ** (1.0 / np.arange(1, _MAX_ORDER + 1))
    ratio = (hypothesis_length + _MATCH_EPSILON) / (reference_length + _COUNT_EPSILON)
    if ratio < 1:
        scores = scores * np.exp(1 - 1 / ratio)
    results = {f"bleu_{order}": float(scores[order - 1]) for order in range(1, _MAX_ORDER + 1)}
    results["hypothesis_length"] = hypothesis_length
    results["reference_length"] = reference_length
    return results


class Bleu(evaluate.Metric):
    """COCO-caption corpus BLEU-1..4 (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
            codebase_urls=["https://github.com/salaniz/pycocoevalcap"],
        )

    def _compute(self, predictions: list, references: list, tokenize: bool = True) -> dict:
        if len(predictions) == 0:
            raise ValueError("`predictions` is empty: pass one caption per sample.")
        references = [[reference] if isinstance(reference, str) else list(reference) for reference in references]
        for index, sample_references in enumerate(references):
            if len(sample_references) == 0:
                raise ValueError(f"`references[{index}]` is empty; every sample needs at least one reference caption.")
        if tokenize:
            predictions = [tokenize_caption(caption) for caption in predictions]
            references = [[tokenize_caption(caption) for caption in sample] for sample in references]
        return corpus_bleu(predictions, references)
