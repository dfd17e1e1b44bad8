"""Prompt lookup (the drafts of speculative decoding): pure, no model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lsp_server.engine.lookup import PromptLookup


def test_copies_what_followed_the_earlier_occurrence():
    lk = PromptLookup([5, 6, 7, 8, 9, 1, 2, 6, 7])
    assert lk.draft(3) == [8, 9, 1]
    assert lk.draft(1) == [8]
    assert lk.draft(0) == []


def test_longest_tail_wins_and_the_latest_occurrence_of_it():
    # tail [3, 4]: occurs at 0 (→ 10) and at 4 (→ 20); tail [2, 3, 4] only at 3 (→ 20)
    lk = PromptLookup([3, 4, 10, 2, 3, 4, 20, 9, 3, 4], max_ngram=3)
    assert lk.draft(2) == [20, 9]
    lk = PromptLookup([3, 4, 10, 7, 3, 4, 20, 9, 3, 4], max_ngram=3)
    assert lk.draft(1) == [20]  # the most recent occurrence of [3, 4]


def test_no_match_and_no_self_match():
    assert PromptLookup([1, 2, 3, 4]).draft(4) == []
    assert PromptLookup([7, 7]).draft(2) == []  # the tail itself is not an earlier occurrence
    assert PromptLookup([7, 7, 7]).draft(2) == [7]


def test_append_extends_the_context():
    lk = PromptLookup([1, 2, 3, 9])
    assert lk.draft(2) == []
    lk.append(1)
    lk.append(2)
    assert lk.draft(2) == [3, 9]
    assert len(lk) == 6


def test_matches_stay_aligned_on_tokens():
    # bytes of 0x00000100, 0x00000001 contain the bytes of other tokens at odd offsets
    lk = PromptLookup([256, 1, 65536, 0, 256, 1])
    assert lk.draft(2) == [65536, 0]
    lk = PromptLookup([1, 256, 3, 1, 1, 256])
    assert lk.draft(1) == [3]


def _reference(ids, k, lo, hi):
    for n in range(min(hi, len(ids) - 1), lo - 1, -1):
        tail = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start : start + n] == tail:
                return ids[start + n : start + n + k]
    return []


@given(st.lists(st.integers(0, 5) | st.integers(0, 2**20), max_size=40), st.integers(0, 8))
def test_same_as_a_plain_search(ids, k):
    assert PromptLookup(ids).draft(k) == _reference(ids, k, 2, 4)


def test_known_answer_drafts_what_comes_next():
    from lsp_server.engine.lookup import KnownAnswer

    known = KnownAnswer([1, 2, 3], [7, 8, 9, 10])
    known.append(7)  # the first token, from the prefill
    assert known.draft(2) == [8, 9]
    for t in (8, 9, 10):
        known.append(t)
    assert known.draft(3) == []
