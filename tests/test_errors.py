"""The one line our messages quote from a library's error."""

from cifar_jax.errors import one_line


def test_one_line_takes_the_first_line_cut_and_survives_an_empty_message():
    assert one_line(ValueError("first\nsecond"), 3) == "ValueError: fir"
    assert (
        one_line(KeyError()) == "KeyError"
    )  # "".splitlines()[0] raised IndexError inside an error handler before
