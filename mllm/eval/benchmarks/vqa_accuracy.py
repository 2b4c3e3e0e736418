"""VQA accuracy as LLaVA's m4c_evaluator.py computes it (TextVQA, VQAv2 val, VizWiz val).

An answer is normalised as EvalAI's answer processor does (lower case; ',' and '?' removed;
"'s" split off; punctuation removed or turned into spaces; periods not before a digit
removed; number words to digits; articles dropped; contractions restored). Its credit is
the mean, over the 10 human answers, of min(#other humans giving it / 3, 1): each human
left out in turn, so 3 matching humans give 0.9 and 4 or more give 1.

Quirks kept because the official number depends on them:
- the period rule is applied at most 32 times per answer (the reference passes re.UNICODE
  where re.sub takes its count);
- ',' is removed before the "digit,digit" test, so that test never fires;
- lists are summed left to right, as the reference does.
"""
from __future__ import annotations

import re

# Written once per word (the reference spells most of them without apostrophes on the
# left). Keys with capitals can never match (text is lower-cased first); kept so the
# table is the reference's.
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())

_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!"]
# "(?!<=\d)" in the reference is a look-ahead that can never fail here (the next
# character is the period itself): only "not followed by a digit" matters.
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")


def _punctuation(text: str) -> str:
    out = text
    glued = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCT:
        # Spaced punctuation goes away; punctuation inside a word becomes a space.
        if p + " " in text or " " + p in text or glued:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=32)


def normalize(answer: str) -> str:
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _punctuation(text)
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def credit(prediction: str, humans: list[str]) -> float:
    """min(#other humans agreeing / 3, 1), averaged over leaving each human out."""
    pred = normalize(prediction)
    gts = [normalize(h) for h in humans]
    accs = []
    for i in range(len(gts)):
        matching = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        accs.append(min(1, matching / 3))
    total = 0
    for a in accs:           # left to right, as the reference's sum()
        total += a
    return total / len(accs)


def mean(values: list[float]) -> float:
    total = 0
    for v in values:
        total += v
    return total / len(values)
