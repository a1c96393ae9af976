import pytest

from vlpet_fx.train import metrics as m

CAPS = [
    "a man riding a horse on the beach",
    "two cats sleeping on a red couch",
    "a plate of food with broccoli and rice",
    "a red bus driving down a city street",
]
# two references per image, the first equal to the caption
CAP_REFS = [[c, f"there is {c} in this picture"] for c in CAPS]


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Yes", "yes"),
        ("  Two  ", "two"),
        ("A   red\tbus\n", "a red bus"),
        ("A dog runs.", "a dog runs"),
        ("a dog runs .", "a dog runs"),
        ("3.5", "3.5"),
        ("", ""),
        ("   ", ""),
    ],
)
def test_normalise(raw, expected):
    assert m.normalise(raw) == expected


def test_exact_match_and_accuracy():
    refs = ["yes", "2", "red"]
    assert m.exact_match(["Yes.", " 2 ", "RED"], refs) == pytest.approx(100.0)
    assert m.exact_match(["no", "3", "blue"], refs) == 0.0
    assert m.exact_match(["yes", "3", "red"], refs) == pytest.approx(200 / 3)
    assert m.accuracy(["True", "false"], ["true", "false"]) == pytest.approx(100.0)
    assert m.accuracy(["true", "true"], ["false", "false"]) == 0.0
    # several acceptable answers per item
    assert m.exact_match(["two", "cat"], [["2", "two"], ["dog"]]) == pytest.approx(50.0)


def test_length_mismatch_and_empty():
    with pytest.raises(ValueError):
        m.exact_match(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        m.task_scores("caption", ["a"], [])
    assert m.exact_match([], []) == 0.0
    assert m.bleu4([], []) == 0.0
    assert m.cider([], []) == 0.0
    assert m.task_scores("vqa", [], []) == {}


def test_bleu4():
    assert m.bleu4(CAPS, CAP_REFS) == pytest.approx(100.0)
    # single reference strings are accepted and normalisation applies
    assert m.bleu4([c.upper() + "." for c in CAPS], CAPS) == pytest.approx(100.0)
    assert m.bleu4(CAPS[::-1], CAP_REFS) < 20.0
    assert m.bleu4(["x y z w v"] * 4, CAP_REFS) == 0.0


def test_cider():
    perfect = m.cider(CAPS, CAP_REFS)
    assert perfect > 100.0
    assert m.cider(CAPS, [[c] for c in CAPS]) == pytest.approx(1000.0)
    wrong = m.cider(CAPS[::-1], CAP_REFS)
    assert wrong < 10.0 < perfect
    partial = m.cider(["a man riding a horse"] + CAPS[1:], CAP_REFS)
    assert wrong < partial < perfect


def test_cider_single_item_corpus_is_zero():
    # document frequency over a one-item reference set zeroes every n-gram weight
    assert m.cider(CAPS[:1], [CAPS[:1]]) == 0.0


def test_task_scores_keys():
    assert set(m.task_scores("vqa", ["yes"], ["yes"])) == {"exact_match"}
    assert set(m.task_scores("gqa", ["yes"], ["no"])) == {"exact_match"}
    assert m.task_scores("nlvr", ["true", "false"], ["true", "true"]) == {"accuracy": 50.0}
    s = m.task_scores("caption", CAPS, CAPS)  # plain strings get wrapped
    assert set(s) == {"bleu4", "cider"}
    assert s["bleu4"] == pytest.approx(100.0) and s["cider"] > 100.0
    assert m.task_scores("my_task", ["A"], ["a"]) == {"exact_match": 100.0}
    for task, names in m.METRICS.items():
        assert list(m.task_scores(task, CAPS, CAP_REFS)) == names


def test_main_score():
    scores = {"exact_match": 1.0, "accuracy": 2.0, "bleu4": 3.0, "cider": 4.0}
    assert m.main_score("vqa", scores) == 1.0
    assert m.main_score("gqa", scores) == 1.0
    assert m.main_score("nlvr", scores) == 2.0
    assert m.main_score("caption", scores) == 4.0
    assert m.main_score("my_task", scores) == 1.0
    with pytest.raises(KeyError):
        m.main_score("caption", {"bleu4": 3.0})
    s = m.task_scores("caption", CAPS, CAP_REFS)
    assert m.main_score("caption", s) == s["cider"]
