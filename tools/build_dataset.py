"""python3 tools/build_dataset.py --docs FILE.jsonl --vocab-size N [--caseops] --val-docs K --out DIR

Builds a dataset in the challenge's format from documents (placeholder: the builder follows).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_gpt as tg  # noqa: E402  (caseops_decode and the CaseOps operators; importing it has no side effects)

_CASEOPS_UNIT = re.compile("[A-Za-z]+|[\ue001-\ue004]")


def _caseops_rewrite(m: re.Match) -> str:
    unit = m.group()
    if unit in tg.CASEOPS_OPERATORS:
        return tg.CASEOPS_ESC + unit
    if unit.islower():
        return unit
    if len(unit) >= 2 and unit.isupper():
        return tg.CASEOPS_ALLCAPS + unit.lower()
    out = []
    for i, ch in enumerate(unit):
        if "A" <= ch <= "Z":
            out.append(tg.CASEOPS_TITLE if i == 0 else tg.CASEOPS_CAPNEXT)
        out.append(ch.lower())
    return "".join(out)


def caseops_encode(text: str) -> str:
    """CaseOps (`lossless_caps_caseops_v1` of the public record, see train_gpt.caseops_decode): over
    each maximal run of ASCII letters, a lower-case word is unchanged, an all-caps word of 2+ letters
    becomes ALLCAPS + the word in lower case, any other word gets TITLE before a capital first letter
    and CAPNEXT before each further capital, each written in lower case; a literal operator character
    becomes ESC + itself; everything else (digits, non-ASCII letters such as "É") is unchanged."""
    return _CASEOPS_UNIT.sub(_caseops_rewrite, text)
