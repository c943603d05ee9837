"""BLEU-4 / ROUGE / exact match of tunelab.eval.metrics against values computed by hand (LLaMA-Factory's rules)."""
from __future__ import annotations

import math

import pytest

pytest.importorskip("nltk")
pytest.importorskip("jieba")
pytest.importorskip("rouge_chinese")

from tunelab.eval.metrics import exact_match, final_answer, sample_scores, similarity_scores  # noqa: E402


def test_english_bleu_over_characters():
    # hyp "the dog" vs ref "the cat", 7 characters each, so the brevity penalty is 1.
    # 1-grams: t,h,e,' ' match, d,o,g do not -> 4/7
    # 2-grams: th, he, "e " match; " d", do, og do not -> 3/6
    # 3-grams: "the", "he " match; "e d", " do", "dog" do not -> 2/5
    # 4-grams: "the " matches; "he d", "e do", " dog" do not -> 1/4
    # BLEU = (4/7 * 3/6 * 2/5 * 1/4) ** (1/4) = 0.411134
    expected = (4 / 7 * 3 / 6 * 2 / 5 * 1 / 4) ** 0.25 * 100
    assert sample_scores("the dog", "the cat")["bleu-4"] == pytest.approx(round(expected, 4), abs=1e-4)
    assert round(expected, 4) == 41.1134


def test_bleu_method3_smoothing_of_zero_counts():
    # hyp "abc" vs ref "abd": p1 = 2/3, p2 = 1/2 ("ab" yes, "bc" no), p3 = 0/1, p4 = 0/1 (no 4-gram at all).
    # method3 (NIST) replaces the k-th zero precision by 1 / (2^k * denominator): p3 -> 1/2, p4 -> 1/4.
    # BLEU = (2/3 * 1/2 * 1/2 * 1/4) ** (1/4) = (1/24) ** 0.25 = 0.451801
    assert sample_scores("abc", "abd")["bleu-4"] == pytest.approx(45.1801, abs=1e-4)


def test_chinese_bleu_and_rouge():
    # BLEU over characters: 我爱北京 is a prefix of 我爱北京天安门, so every n-gram precision is 1 (4/4, 3/3, 2/2, 1/1);
    # brevity penalty exp(1 - 7/4) = exp(-0.75) = 0.472367.
    # jieba: 我/爱/北京 vs 我/爱/北京/天安门.
    # ROUGE-1: 3 of 3 hypothesis words, 3 of 4 reference words: F = 2 * 1 * 0.75 / 1.75 = 0.857143
    # ROUGE-2: bigrams {我 爱, 爱 北京} all in the reference's 3: P = 1, R = 2/3, F = 0.8
    # ROUGE-L: LCS 3: P = 1, R = 3/4, F = 0.857143
    import jieba

    assert list(jieba.cut("我爱北京天安门")) == ["我", "爱", "北京", "天安门"]
    scores = sample_scores("我爱北京", "我爱北京天安门")
    assert scores["bleu-4"] == pytest.approx(round(math.exp(-0.75) * 100, 4), abs=1e-4)
    assert scores["rouge-1"] == pytest.approx(85.7143, abs=1e-3)
    assert scores["rouge-2"] == pytest.approx(80.0, abs=1e-3)
    assert scores["rouge-l"] == pytest.approx(85.7143, abs=1e-3)


def test_english_rouge_on_word_sets():
    # Words: the cat sat vs the cat sat on the mat. rouge-chinese counts distinct n-grams (sets) for ROUGE-N:
    # ROUGE-1: reference set {the, cat, sat, on, mat} = 5, overlap 3: P = 1, R = 3/5, F = 2 * 0.6 / 1.6 = 0.75
    # ROUGE-2: hyp {the cat, cat sat}, ref 5 bigrams: P = 1, R = 2/5, F = 0.8 / 1.4 = 0.571429
    # ROUGE-L: LCS 3 over 6 reference words: P = 1, R = 1/2, F = 1 / 1.5 = 0.666667
    scores = sample_scores("the cat sat", "the cat sat on the mat")
    assert scores["rouge-1"] == pytest.approx(75.0, abs=1e-3)
    assert scores["rouge-2"] == pytest.approx(57.1429, abs=1e-3)
    assert scores["rouge-l"] == pytest.approx(66.6667, abs=1e-3)


@pytest.mark.parametrize("predict", ["", "   ", "\n"])
def test_empty_prediction_scores_zero(predict):
    assert sample_scores(predict, "我爱北京天安门") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_empty_reference_scores_zero_rouge():
    scores = sample_scores("hello", "")
    assert (scores["rouge-1"], scores["rouge-2"], scores["rouge-l"]) == (0.0, 0.0, 0.0)


def test_mean_over_samples():
    # sample 1: identical text -> every score 100; sample 2: empty prediction -> 0; the mean is 50.
    scores = similarity_scores(["hello world", ""], ["hello world", "anything"])
    assert scores == {"bleu-4": 50.0, "rouge-1": pytest.approx(50.0, abs=1e-3), "rouge-2": pytest.approx(50.0, abs=1e-3),
                      "rouge-l": pytest.approx(50.0, abs=1e-3)}


def test_exact_match_on_final_answer_marker():
    assert final_answer("so 48 + 2 = 50\n#### 50") == "50"
    assert final_answer("#### $1,000.") == "1000"
    assert final_answer("#### 50.0") == "50"
    assert final_answer("no marker") is None
    predicts = ["reasoning\n#### 50", "#### 1,000", "the answer is 3", "#### 7"]
    labels = ["#### 50", "#### 1000", "#### 3", "no marker here"]
    # 3 references have the marker; 2 predictions match them (the third prediction has no marker: wrong)
    assert exact_match(predicts, labels) == (pytest.approx(200 / 3), 3)
    assert exact_match(["a"], ["b"]) is None
