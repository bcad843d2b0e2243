"""METEOR for captions through the reference METEOR 1.5 Java program, as the COCO caption evaluation runs it.

RegionBLIP, Groma and TAP-v2 report METEOR from pycocoevalcap, which drives ``meteor-1.5.jar`` (exact, stem, synonym
and paraphrase matching with English resources) over its stdin protocol. Those matchers and resources cannot be
re-implemented faithfully in a few hundred lines, so this metric runs the same jar the same way instead of faking a
score: captions are PTB-tokenised with punctuation removed (the pure-Python tokenizer shared with the other caption
metrics), each sample is scored with ``SCORE ||| ref ||| ... ||| hyp``, and one ``EVAL`` line aggregates the
corpus score (METEOR's own corpus statistic, not the mean of the per-sample scores).

Requirements, checked when computing: a Java runtime on ``PATH`` and the jar, found from ``meteor_jar=``, the
``METEOR_JAR`` environment variable, or an installed ``pycocoevalcap`` package (which ships
``pycocoevalcap/meteor/meteor-1.5.jar`` and its ``data/`` folder). Missing either raises a ``RuntimeError`` that says
how to install it.
"""

import importlib.util
import os
import re
import shutil
import subprocess

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
METEOR 1.5 (the COCO caption evaluation's METEOR): the reference Java implementation run on PTB-tokenised,
punctuation-free captions with `-l en -norm`. Needs Java and meteor-1.5.jar (e.g. `pip install pycocoevalcap`).
"""

_CITATION = """\
@inproceedings{denkowski2014meteor,
  title={Meteor Universal: Language Specific Translation Evaluation for Any Target Language},
  author={Denkowski, Michael and Lavie, Alon},
  booktitle={Proceedings of the Ninth Workshop on Statistical Machine Translation},
  year={2014}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): one generated caption per sample.
    references (`list` of `list[str]` or `list` of `str`): the reference captions of each sample (at least one).
    tokenize (`bool`, default True): PTB-tokenise and drop punctuation first; False for pre-tokenised text.
    meteor_jar (`str`, optional): path to meteor-1.5.jar (default: $METEOR_JAR, then the jar of an installed
        pycocoevalcap).
    java_memory (`str`, default "2G"): the -Xmx heap size of the Java process.
Returns:
    meteor (`float` in [0, 1]): the corpus score (what COCOEvalCap reports). scores (`list[float]`): per-sample
    scores; mean_sample_score (`float`): their mean.
Raises:
    RuntimeError: no Java runtime, or no meteor-1.5.jar.
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


def find_meteor_jar(meteor_jar: str | None = None) -> str:
    """Locate meteor-1.5.jar (argument, then ``$METEOR_JAR``, then an installed pycocoevalcap) or raise."""
    if meteor_jar:
        if not os.path.isfile(meteor_jar):
            raise RuntimeError(
                f"`meteor_jar` points to {meteor_jar!r}, which is not a file; pass the meteor-1.5.jar path."
            )
        return meteor_jar
    candidates = [os.environ.get("METEOR_JAR")]
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(os.path.join(location, "meteor", "meteor-1.5.jar"))
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            return candidate
    raise RuntimeError(
        "METEOR needs the reference meteor-1.5.jar, which is not installed. `pip install pycocoevalcap` ships it "
        "(with its paraphrase data); or pass `meteor_jar=/path/to/meteor-1.5.jar` or set METEOR_JAR."
    )


def run_meteor(
    hypotheses: list[str], references: list[list[str]], jar: str, java_memory: str = "2G"
) -> tuple[float, list[float]]:
    """Score tokenised captions with the METEOR jar's stdio protocol; returns (corpus score, per-sample scores)."""
    command = ["java", "-jar", f"-Xmx{java_memory}", os.path.basename(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
    # The jar finds its data/ folder relative to the working directory, as pycocoevalcap runs it.
    process = subprocess.Popen(
        command,
        cwd=os.path.dirname(os.path.abspath(jar)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
    try:
        statistics = []
        for hypothesis, sample_references in zip(hypotheses, references):
            hypothesis = hypothesis.replace("|||", "").replace("  ", " ")
            process.stdin.write(" ||| ".join(["SCORE", *sample_references, hypothesis]) + "\n")
            process.stdin.flush()
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"METEOR exited while scoring: {process.stderr.read().strip()[-2000:]}")
            statistics.append(line.strip())
        process.stdin.write(" ||| ".join(["EVAL", *statistics]) + "\n")
        process.stdin.flush()
        scores = [float(process.stdout.readline().strip()) for _ in hypotheses]
        corpus_score = float(process.stdout.readline().strip())
    finally:
        process.stdin.close()
        process.kill()
        process.wait()
    return corpus_score, scores


class Meteor(evaluate.Metric):
    """COCO-caption METEOR via the reference jar (see the module docstring)."""

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
            codebase_urls=["https://github.com/salaniz/pycocoevalcap", "https://www.cs.cmu.edu/~alavie/METEOR/"],
        )

    def _compute(
        self,
        predictions: list,
        references: list,
        tokenize: bool = True,
        meteor_jar: str | None = None,
        java_memory: str = "2G",
    ) -> dict:
        if shutil.which("java") is None:
            raise RuntimeError(
                "METEOR needs a Java runtime (the reference METEOR 1.5 is a Java program) and `java` is not on PATH. "
                "Install one, e.g. `apt-get install default-jre-headless` or `conda install -c conda-forge openjdk`."
            )
        jar = find_meteor_jar(meteor_jar)
        if len(predictions) == 0:
            raise ValueError("`predictions` is empty: pass one caption per sample.")
        references = [[reference] if isinstance(reference, str) else list(reference) for reference in references]
        for index, sample_references in enumerate(references):
            if len(sample_references) == 0:
                raise ValueError(f"`references[{index}]` is empty; every sample needs at least one reference caption.")
        if tokenize:
            predictions = [tokenize_caption(caption) for caption in predictions]
            references = [[tokenize_caption(caption) for caption in sample] for sample in references]
        corpus_score, scores = run_meteor(predictions, references, jar, java_memory)
        return {"meteor": corpus_score, "scores": scores, "mean_sample_score": float(np.mean(scores))}
