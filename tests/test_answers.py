"""Reading and scoring answers (engine/text/answers.py): exact values, never a crash on what a model writes."""
from __future__ import annotations

import pytest

from engine.text.answers import equation_value, extract_answer, is_correct, parse_label, unreadable_labels


@pytest.mark.parametrize("prediction,label,correct", [
    ("57505", "57500", False),  # a relative tolerance of 1e-4 would call this right (23 GSM8K test labels are > 10^4)
    ("57500", "57,500", True),
    ("72", "72.0", True),
    ("0.10", "0.1", True),
    ("0.1000001", "0.1", False),
    ("-3", "3", False),
    ("1" * 400, "1" * 400, True),  # beyond float range: compared digit for digit
    ("1" * 399 + "2", "1" * 400, False),
    ("12345678901234567890", "12345678901234567891", False),  # beyond float precision
])
def test_numbers_compare_by_exact_value(prediction, label, correct):
    assert is_correct(prediction, label, "GSM8K") is correct


def test_answers_are_read_from_the_answer_sentence():
    assert extract_answer("48 / 2 = 24 clips. 48 + 24 = 72. Therefore, the answer is 72 .", "GSM8K") == "72"
    assert extract_answer("The answer is 1,234,567.", "GSM8K") == "1234567"
    assert extract_answer("So the answer is 2.50 dollars.", "GSM8K") == "2.5"
    assert extract_answer("The answer is twelve.", "GSM8K") == "12"
    assert extract_answer("no digits, no number", "GSM8K") is None
    assert extract_answer("So the answer is (b) bank.", "CSQA") == "B"


@pytest.mark.parametrize("text", ["The answer is " + "9" * 400 + " .", "The answer is 1e999999.", "The answer is nan.",
                                  "The answer is inf.", "The answer is " + "7" * 5000 + ".", "(" * 500 + "1" + ")" * 500])
def test_what_a_model_writes_never_crashes_scoring(text):
    prediction = extract_answer(text, "GSM8K")
    assert is_correct(prediction, "5", "GSM8K") is False
    assert is_correct(extract_answer(text, "SVAMP"), "( 2.0 + 3.0 )", "SVAMP") is False


def test_a_400_digit_answer_keeps_every_digit():
    assert extract_answer("The answer is " + "9" * 400 + " .", "GSM8K") == "9" * 400


@pytest.mark.parametrize("label", ["nan", "NaN", "inf", "-inf", "abc", None, True, "", "1e99999"])
def test_labels_that_are_not_finite_numbers_are_unreadable(label):
    assert parse_label(label, "GSM8K") is None
    assert is_correct("1", label, "GSM8K") is False


def test_unreadable_labels_are_counted():
    assert unreadable_labels([{"label": "3"}, {"label": "nan"}, {}, {"label": "4,000"}], "GSM8K") == [1, 2]


def test_svamp_equations_are_exact_rationals():
    assert equation_value("( 15.0 - 4.0 )") == 11
    assert equation_value("( 10.0 / 3.0 )") * 3 == 10  # exactly a third, no float rounding
    assert equation_value("0.1 + 0.2") == equation_value("0.3")  # 0.30000000000000004 in floats
    assert is_correct(extract_answer("The answer is ( 0.1 + 0.2 ).", "SVAMP"), "0.3", "SVAMP")
    assert is_correct(extract_answer("The answer is (10.0 / 3.0).", "SVAMP"), "( 20.0 / 6.0 )", "SVAMP")
    assert not is_correct("3.333333", "( 10.0 / 3.0 )", "SVAMP")
    assert equation_value("1 / 0") is None and equation_value("2 ** 1000") is None and equation_value("__import__") is None
