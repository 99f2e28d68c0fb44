# The data builder and the CaseOps transform: python3 -m pytest -q tests/test_build_dataset.py
import sys

import pytest

import train_gpt as tg
from conftest import REPO, TEXT

sys.path.insert(0, str(REPO / "tools"))
import build_dataset as bd  # noqa: E402

TITLE, ALLCAPS, CAPNEXT, ESC = tg.CASEOPS_OPERATORS

# ----------------------------------------------------------------------------- the CaseOps transform

ADVERSARIAL = [
    "", "A", "I", "a", "NASA", "iPhone", "McDonald", "x2Y", "Éclair", "ÉCLAIR", "ß", "STRASSE ß",
    "The NASA Launch", "HTTPServer", "aBcDeF", "ABCdef", "123", "A1B2", "O'Neil", "U.S.A.",
    TITLE, ALLCAPS + "nasa", ESC, ESC + ESC, CAPNEXT + "x", "A" + TITLE + "b", "AB" + ESC + "cd",
    "x" * 5000, "Y" * 5000, "Ab" * 2000, ("Zz" + ESC) * 1000, "\n\n  Mixed\tCASE  text\n",
]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_caseops_round_trip(text):
    encoded = bd.caseops_encode(text)
    assert tg.caseops_decode(encoded) == text
    # no capital ASCII letter survives the rewrite, and every operator in the input is escaped
    assert not any("A" <= ch <= "Z" for ch in encoded)


def test_caseops_round_trip_on_fixture_text():
    for name in ("jargon.txt", "devil.txt"):
        text = (TEXT / name).read_text(encoding="utf-8")
        encoded = bd.caseops_encode(text)
        assert encoded != text and tg.caseops_decode(encoded) == text


def test_caseops_exact_rewrites():
    # the rules of the public record (FRONTIER.md), spelled out
    assert bd.caseops_encode("The NASA Launch") == f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"
    assert bd.caseops_encode("iPhone") == f"i{CAPNEXT}phone"
    assert bd.caseops_encode("McDonald") == f"{TITLE}mc{CAPNEXT}donald"
    assert bd.caseops_encode("A I") == f"{TITLE}a {TITLE}i"
    assert bd.caseops_encode("x2Y") == f"x2{TITLE}y"
    assert bd.caseops_encode("Éclair") == "Éclair"  # only ASCII letters are rewritten
    assert bd.caseops_encode(f"a{TITLE}b") == f"a{ESC}{TITLE}b"


@pytest.mark.parametrize("text", ["", "lower case text, digits 123 and ß é ü.", "x" * 3000])
def test_caseops_identity_on_lower_case(text):
    assert bd.caseops_encode(text) == text and tg.caseops_decode(text) == text


@pytest.mark.parametrize("bad", [TITLE, f"a{ALLCAPS}", f"{CAPNEXT}1", f"{ESC}x", ESC, f"{ALLCAPS} word"])
def test_caseops_decode_rejects_malformed(bad):
    with pytest.raises(ValueError, match="caseops_decode: operator U\\+E00"):
        tg.caseops_decode(bad)
