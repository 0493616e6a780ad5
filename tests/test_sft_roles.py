"""Token roles of a written solution (experiments/sft_roles.py)."""

from experiments.sft_roles import token_roles


def test_token_roles_of_a_labelled_solution():
    pieces = [" b", "5", ":", "3", "+", "5", "=", "8", " ;", " c", "7", ":", "8", "+", "7", "=",
              "1", "5", " .", " ", "Answer:", " ", "1", "5", ""]  # fmt: skip
    roles = token_roles(pieces)
    sep = "separator"
    assert roles[:8] == [
        "label", "term (look-up)", sep, "partial sum carried", sep, "term (copied again)", sep,
        "new partial sum",
    ]  # fmt: skip
    assert roles[16:18] == ["new partial sum"] * 2
    assert roles[-5:] == ["answer prefix", "separator", "answer", "answer", "separator"]


def test_token_roles_of_a_carried_solution():
    pieces = [" b", "5", ":", "3", "+", "5", "=", "8", " |", " c", "7", " d", "2", " ;", " c",
              "7", ":", "8", "+", "7", "=", "1", "5", " |", " d", "2", " ;"]  # fmt: skip
    roles = token_roles(pieces)
    carried = ["carried label", "carried term"] * 2
    assert roles[:2] == ["label", "term (look-up)"]
    assert roles[8:14] == ["separator", *carried, "separator"]
    assert roles[14:16] == ["label", "term (look-up)"]  # The head copies the first carried term.
    assert roles[23:] == ["separator", "carried label", "carried term", "separator"]
