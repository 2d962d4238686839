import pytest

from fs_pipeline.audio.asr import word_error_rate


@pytest.mark.parametrize(
    "reference, hypothesis",
    [
        ("Numbers like seven, twelve and forty two.", "Numbers like 7, 12 and 42."),
        ("It was seven. Twelve came later.", "it was 7. 12 came later"),
        ("Three thousand people paid five dollars.", "3,000 people paid $5."),
        ("Twenty-one is fifty percent of forty-two", "21 is 50% of 42"),
        ("Mr. Smith met Dr. Jones on St. John Street.", "Mister Smith met Doctor Jones on Saint John Street"),
        ("Hello, world! Isn't it grand?", "hello world is not it grand"),
        ("THE COLOUR OF THE CENTRE", "the color of the center"),
        ("It was seven... Twelve came later.", "it was 7, 12 came later"),
    ],
)
def test_the_same_words_written_differently_are_no_error(reference, hypothesis):
    assert word_error_rate(reference, hypothesis) == 0.0
    assert word_error_rate(hypothesis, reference) == 0.0


def test_real_errors_still_count():
    assert word_error_rate("Mr. Smith owes forty two dollars.", "Mister Smyth owes 42 dollars") == pytest.approx(1 / 4)
    assert word_error_rate("It costs forty two dollars.", "It costs 43 dollars.") == pytest.approx(1 / 3)
    reference = "Please call me back when you get this message."
    assert word_error_rate(reference, "Please call me back when you got this message!") == pytest.approx(1 / 9)  # substitution
    assert word_error_rate(reference, "Please call me when you get this message") == pytest.approx(1 / 9)  # deletion
    assert word_error_rate(reference, "Please call me back now when you get this message") == pytest.approx(1 / 9)  # insertion
    assert word_error_rate("The quick brown fox.", "") == 1.0
