"""Stop strings: text that may start one is held back, a stop string split over tokens is found,
the text before it is the last piece."""

from __future__ import annotations

from pipo.serve.text_stream import TextStream


class Pieces:
    """A decoder whose token i decodes to ``pieces[i]``."""

    def __init__(self, pieces):
        self.pieces = pieces

    def feed(self, token):
        return self.pieces[token]

    def flush(self):
        return ""


def run(pieces, stops):
    stream = TextStream(Pieces(pieces), tuple(stops))
    sent = [stream.feed(i) for i in range(len(pieces)) if not stream.stopped]
    return sent + [stream.flush()], stream


def test_a_stop_string_split_over_tokens_cuts_the_text_before_it():
    sent, stream = run(["Hello", " wo", "rld", "END", "more"], ["woEND", "rldE"])
    assert "".join(sent) == "Hello wo" and stream.stopped and stream.tokens == 4


def test_the_last_characters_are_held_back_until_no_stop_string_can_start_there():
    sent, stream = run(["ab", "c", "x", "yz"], ["cxq"])  # holds len("cxq") - 1 = 2 characters
    assert sent == ["", "a", "b", "cx", "yz"] and not stream.stopped


def test_without_stop_strings_every_piece_goes_out_at_once():
    sent, _ = run(["a", "b", "c"], [])
    assert sent == ["a", "b", "c", ""]
