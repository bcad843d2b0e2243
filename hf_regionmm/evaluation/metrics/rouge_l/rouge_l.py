"""ROUGE-L for captions, as the COCO caption evaluation (pycocoevalcap ``Rouge``) computes it.

Reported next to BLEU and CIDEr by RegionBLIP, Groma and TAP-v2 for (region) captioning. Per sample: the longest
common subsequence (LCS) of the hypothesis with each reference gives a precision ``lcs / len(hypothesis)`` and a
recall ``lcs / len(reference)``; the *maximum* precision and the *maximum* recall over the references (taken
separately, as pycocoevalcap does, not from the same reference) combine into
``F = (1 + beta^2) P R / (R + beta^2 P)`` with ``beta = 1.2``. The corpus score is the mean over samples.

Sentences are PTB-tokenised with punctuation removed (pure-Python tokenizer), then split on single spaces as in
pycocoevalcap, so an empty caption is one empty token there too.
"""

import re

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
ROUGE-L as in the COCO caption evaluation toolkit (pycocoevalcap): LCS-based precision and recall, maximised over the
references separately, combined as an F-measure with beta = 1.2, averaged over samples. Captions are PTB-tokenised
with punctuation removed.
"""

_CITATION = """\
@inproceedings{lin2004rouge,
  title={ROUGE: A Package for Automatic Evaluation of Summaries},
  author={Lin, Chin-Yew},
  booktitle={Text Summarization Branches Out},
  year={2004}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): one generated caption per sample.
    references (`list` of `list[str]` or `list` of `str`): the reference captions of each sample (at least one).
    tokenize (`bool`, default True): PTB-tokenise and drop punctuation first; False for pre-tokenised text.
    beta (`float`, default 1.2): recall weight of the F-measure.
Returns:
    rouge_l (`float` in [0, 1]): mean over samples. scores (`list[float]`): per-sample scores.
Examples:
    >>> rouge = hf_regionmm.evaluation.load_metric("rouge_l")
    >>> round(rouge.compute(predictions=["a dog runs"], references=[["a dog"]])["rouge_l"], 4)
    0.8299
"""


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


def longest_common_subsequence(first: list[str], second: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, O(len1 * len2))."""
    previous = [0] * (len(second) + 1)
    for token in first:
        current = [0] * (len(second) + 1)
        for index, other in enumerate(second):
            current[index + 1] = previous[index] + 1 if token == other else max(previous[index + 1], current[index])
        previous = current
    return previous[-1]


def sentence_rouge_l(hypothesis: str, references: list[str], beta: float = 1.2) -> float:
    """pycocoevalcap ROUGE-L of one hypothesis against its references (single-space tokenised strings)."""
    hypothesis_tokens = hypothesis.split(" ")
    precisions, recalls = [], []
    for reference in references:
        reference_tokens = reference.split(" ")
        lcs = longest_common_subsequence(reference_tokens, hypothesis_tokens)
        precisions.append(lcs / len(hypothesis_tokens))
        recalls.append(lcs / len(reference_tokens))
    precision, recall = max(precisions), max(recalls)
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


class RougeL(evaluate.Metric):
    """COCO-caption ROUGE-L (see the module docstring)."""

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

    def _compute(self, predictions: list, references: list, tokenize: bool = True, beta: float = 1.2) -> dict:
        if len(predictions) == 0:
            raise ValueError("`predictions` is empty: pass one caption per sample.")
        references = [[reference] if isinstance(reference, str) else list(reference) for reference in references]
        for index, sample_references in enumerate(references):
            if len(sample_references) == 0:
                raise ValueError(f"`references[{index}]` is empty; every sample needs at least one reference caption.")
        if tokenize:
            predictions = [tokenize_caption(caption) for caption in predictions]
            references = [[tokenize_caption(caption) for caption in sample] for sample in references]
        scores = [sentence_rouge_l(hypothesis, refs, beta) for hypothesis, refs in zip(predictions, references)]
        return {"rouge_l": float(np.mean(scores)), "scores": scores}
