"""CIDEr-D for captions, as the COCO caption evaluation (pycocoevalcap ``Cider``) computes it.

The headline captioning number of RegionBLIP (Sec. 4: RefCOCO region captioning, Objaverse, ScanRefer), Groma and
TAP-v2 (Visual Genome region captioning). Re-implemented from the definition in Vedantam et al. with every detail of
the pycocoevalcap code that changes the number:

* PTB tokenisation, lower case, punctuation removed (pure-Python tokenizer, no Java), unless ``tokenize=False``;
* TF-IDF vectors of 1..4-grams; the document frequency of an n-gram is the number of *samples* whose references
  contain it, and the IDF is ``log(number of samples) - log(max(1, df))`` -- so the IDF comes from the evaluated
  references, and a corpus of a single sample scores 0 by construction;
* per n-gram order, the cosine similarity with each reference uses the *clipped* hypothesis weights
  ``min(hyp, ref) * ref`` (the "-D" part), times a Gaussian length penalty ``exp(-delta^2 / (2 * 6^2))``;
* the length in that penalty is the number of *bigrams* of each sentence (pycocoevalcap counts ``n == 1`` with a
  zero-based order index), which equals the word-count difference for non-empty sentences;
* the four orders are averaged, the references of a sample are averaged, and the result is multiplied by 10. That
  is pycocoevalcap's scale (a good COCO model scores about 1.1); papers print the value x 100 (113.5).
"""

import math
import re

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
CIDEr-D as in the COCO caption evaluation toolkit (pycocoevalcap): TF-IDF weighted 1..4-gram cosine similarity with
clipping and a Gaussian length penalty (sigma 6), IDF from the references of the evaluated corpus, averaged over
references and n-gram orders, times 10. Captions are PTB-tokenised with punctuation removed.
"""

_CITATION = """\
@inproceedings{vedantam2015cider,
  title={CIDEr: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C Lawrence and Parikh, Devi},
  booktitle={CVPR},
  year={2015}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): one generated caption per sample.
    references (`list` of `list[str]` or `list` of `str`): the reference captions of each sample (at least one).
    tokenize (`bool`, default True): PTB-tokenise and drop punctuation first; False for pre-tokenised text.
    sigma (`float`, default 6.0): standard deviation of the length penalty.
Returns:
    cider_d (`float`): corpus mean (pycocoevalcap scale: 0..10, papers multiply by 100).
    scores (`list[float]`): per-sample scores.
Examples:
    >>> cider = hf_regionmm.evaluation.load_metric("cider_d")
    >>> cider.compute(predictions=["a dog", "a cat"], references=[["a dog"], ["a bird"]])["cider_d"]
    2.5
"""

_MAX_ORDER = 4


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


def _ngram_counts(sentence: str) -> dict[tuple[str, ...], int]:
    """Counts of every 1..4-gram of a whitespace-tokenised sentence."""
    words = sentence.split()
    counts: dict[tuple[str, ...], int] = {}
    for order in range(1, _MAX_ORDER + 1):
        for start in range(len(words) - order + 1):
            ngram = tuple(words[start : start + order])
            counts[ngram] = counts.get(ngram, 0) + 1
    return counts


def corpus_cider_d(hypotheses: list[str], references: list[list[str]], sigma: float = 6.0) -> list[float]:
    """Per-sample CIDEr-D (pycocoevalcap scale) of whitespace-tokenised text.

    Args:
        hypotheses: ``n`` hypothesis strings.
        references: ``n`` non-empty lists of reference strings.
        sigma: standard deviation of the Gaussian length penalty.

    Returns:
        ``n`` scores.
    """
    reference_counts = [[_ngram_counts(reference) for reference in sample] for sample in references]
    document_frequency: dict[tuple[str, ...], int] = {}
    for sample in reference_counts:
        for ngram in {ngram for counts in sample for ngram in counts}:
            document_frequency[ngram] = document_frequency.get(ngram, 0) + 1
    log_num_samples = np.log(float(len(references)))

    def tfidf(counts: dict[tuple[str, ...], int]) -> tuple[list[dict], list[float], int]:
        vectors: list[dict] = [{} for _ in range(_MAX_ORDER)]
        norms = [0.0] * _MAX_ORDER
        bigram_count = 0
        for ngram, term_frequency in counts.items():
            order = len(ngram) - 1
            weight = float(term_frequency) * (log_num_samples - np.log(max(1.0, document_frequency.get(ngram, 0))))
            vectors[order][ngram] = weight
            norms[order] += weight**2
            if order == 1:
                bigram_count += term_frequency
        return vectors, [math.sqrt(norm) for norm in norms], bigram_count

    scores = []
    for hypothesis, sample_counts in zip(hypotheses, reference_counts):
        hypothesis_vectors, hypothesis_norms, hypothesis_length = tfidf(_ngram_counts(hypothesis))
        total = np.zeros(_MAX_ORDER)
        for counts in sample_counts:
            reference_vectors, reference_norms, reference_length = tfidf(counts)
            penalty = np.e ** (-(float(hypothesis_length - reference_length) ** 2) / (2 * sigma**2))
            for order in range(_MAX_ORDER):
                similarity = sum(
                    min(weight, reference_vectors[order].get(ngram, 0.0)) * reference_vectors[order].get(ngram, 0.0)
                    for ngram, weight in hypothesis_vectors[order].items()
                )
                if hypothesis_norms[order] != 0 and reference_norms[order] != 0:
                    similarity /= hypothesis_norms[order] * reference_norms[order]
                total[order] += similarity * penalty
        scores.append(float(np.mean(total) / len(sample_counts) * 10.0))
    return scores


class CiderD(evaluate.Metric):
    """COCO-caption CIDEr-D (see the module docstring)."""

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

    def _compute(self, predictions: list, references: list, tokenize: bool = True, sigma: float = 6.0) -> dict:
        if len(predictions) == 0:
            raise ValueError("`predictions` is empty: pass one caption per sample.")
        if sigma <= 0:
            raise ValueError(f"`sigma` must be positive; got {sigma}.")
        references = [[reference] if isinstance(reference, str) else list(reference) for reference in references]
        for index, sample_references in enumerate(references):
            if len(sample_references) == 0:
                raise ValueError(f"`references[{index}]` is empty; every sample needs at least one reference caption.")
        if tokenize:
            predictions = [tokenize_caption(caption) for caption in predictions]
            references = [[tokenize_caption(caption) for caption in sample] for sample in references]
        scores = corpus_cider_d(predictions, references, sigma)
        return {"cider_d": float(np.mean(scores)), "scores": scores}
