"""VQA soft accuracy, the standard VQA v2 / VizWiz metric (used for the image-level chat ability of the MLLMs here).

For a question with ``n`` human answers (10 in VQA v2), the accuracy of a predicted answer is the average, over the
``n`` leave-one-out subsets of ``n - 1`` humans, of ``min(#humans in the subset who gave that answer / 3, 1)`` --
"the answer is right if at least 3 humans said it", smoothed over annotator subsets. With 10 answers this is
``min(count / 3, 1)`` for counts 0..2 and 3 (giving 0.9) and 1 from 4 up.

Answers are normalised as in the official ``vqaEval.py``: punctuation handling (``processPunctuation``), then lower
case, number words to digits, articles dropped and the contraction table (``processDigitArticle``). The official
script normalises the human answers only when they disagree (the released annotations are already normalised); this
metric normalises the prediction and every human answer always, which is identical on the official annotations and
keeps raw answers (e.g. "Two" vs "2") from scoring 0 on other data sets.
"""

import re

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
VQA accuracy: min(#humans that gave the predicted answer / 3, 1), averaged over the leave-one-out subsets of the human
answers, after the official VQA answer normalisation (punctuation, articles, number words to digits, contractions).
"""

_CITATION = """\
@inproceedings{antol2015vqa,
  title={VQA: Visual Question Answering},
  author={Antol, Stanislaw and Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and Batra, Dhruv and Zitnick, C Lawrence and Parikh, Devi},
  booktitle={ICCV},
  year={2015}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the predicted answer of each question.
    references (`list` of `list[str]`): the human answers of each question (10 in VQA v2; at least 2, since the
        leave-one-out average of a single answer is always 0 -- use exact match for single-answer data).
Returns:
    accuracy (`float` in [0, 1]): mean over questions (the official tool prints it x 100).
    scores (`list[float]`): per-question accuracy.
Examples:
    >>> vqa = hf_regionmm.evaluation.load_metric("vqa_accuracy")
    >>> vqa.compute(predictions=["Two"], references=[["2", "2", "two", "3", "2", "2", "2", "2", "2", "2"]])["accuracy"]
    1.0
"""


# ---- Helpers copied verbatim from hf_regionmm/evaluation/functional.py (tests/test_metrics.py checks that they
# stay identical; edit both together).
# names: VQA_CONTRACTIONS, VQA_NUMBER_WORDS, VQA_ARTICLES, VQA_PUNCTUATION, _VQA_PERIOD_STRIP, _VQA_COMMA_STRIP, normalize_vqa_answer
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


# ---- End of copied helpers.


def question_accuracy(prediction: str, answers: list[str]) -> float:
    """Soft accuracy of one normalised prediction against its normalised human answers."""
    matches = [answer == prediction for answer in answers]
    total = sum(matches)
    # Leaving human i out removes their vote from the count only if they agreed with the prediction.
    return float(np.mean([min(1.0, (total - match) / 3.0) for match in matches]))


class VqaAccuracy(evaluate.Metric):
    """Official-style VQA soft accuracy (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            codebase_urls=["https://github.com/GT-Vision-Lab/VQA"],
        )

    def _compute(self, predictions: list, references: list) -> dict:
        if len(predictions) == 0:
            raise ValueError("`predictions` is empty: pass one answer per question.")
        scores = []
        for index, (prediction, answers) in enumerate(zip(predictions, references)):
            if answers is None or len(answers) < 2:
                raise ValueError(
                    f"`references[{index}]` must hold at least 2 human answers (10 in VQA v2); got {answers!r}. "
                    "For single-answer data use exact match instead."
                )
            normalized = [normalize_vqa_answer(answer) for answer in answers]
            scores.append(question_accuracy(normalize_vqa_answer(prediction), normalized))
        return {"accuracy": float(np.mean(scores)), "scores": scores}
