"""normfold.drift: KL divergence, top-1 agreement and absolute errors between two models' outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from normfold.drift import Drift, measure, summary_lines


def kl_rows(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) per row, written the plain way."""
    p = np.exp(p_logits) / np.exp(p_logits).sum(-1, keepdims=True)
    q = np.exp(q_logits) / np.exp(q_logits).sum(-1, keepdims=True)
    return (p * np.log(p / q)).sum(-1)


def test_identical_outputs_have_no_drift():
    logits = np.random.default_rng(0).standard_normal((2, 3, 7)).astype(np.float32)
    (out,) = measure([({"logits": logits}, {"logits": logits.copy()}, 2)]).outputs
    assert out.max_abs_error == 0 and out.mean_abs_error == 0
    assert out.kl_divergence == pytest.approx(0.0, abs=1e-12) and out.top1_agreement == 1.0 and out.rows == 6


def test_kl_top1_and_errors_match_their_definitions():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((4, 5))
    cand = ref + 0.3 * rng.standard_normal((4, 5))
    cand[1] = ref[1]
    cand[1, ref[1].argmin()] = ref[1].max() + 1.0  # row 1's top-1 moves
    (out,) = measure([({"y": ref}, {"y": cand}, 4)]).outputs
    assert out.kl_divergence == pytest.approx(kl_rows(ref, cand).mean(), rel=1e-10)
    expected_agreement = np.mean(ref.argmax(-1) == cand.argmax(-1))
    assert expected_agreement < 1 and out.top1_agreement == expected_agreement
    assert out.max_abs_error == pytest.approx(np.abs(ref - cand).max())
    assert out.mean_abs_error == pytest.approx(np.abs(ref - cand).mean())


def test_batches_accumulate_to_the_same_numbers_as_one_batch():
    rng = np.random.default_rng(2)
    ref, cand = rng.standard_normal((6, 3, 4)), rng.standard_normal((6, 3, 4))
    whole = measure([({"y": ref}, {"y": cand}, 6)])
    split = measure([({"y": ref[:2]}, {"y": cand[:2]}, 2), ({"y": ref[2:]}, {"y": cand[2:]}, 4)])
    assert split.samples == whole.samples == 6
    a, b = whole.outputs[0].to_dict(), split.outputs[0].to_dict()
    assert a.keys() == b.keys() and a.pop("name") == b.pop("name") and a.pop("mismatches") is b.pop("mismatches")
    assert a == pytest.approx(b, rel=1e-12)


def test_integer_outputs_count_mismatches_and_vectors_of_one_have_no_kl():
    drift = measure([({"ids": np.array([1, 2, 3]), "score": np.ones((3, 1))},
                      {"ids": np.array([1, 5, 3]), "score": np.full((3, 1), 1.5)}, 3)])
    ids, score = drift.outputs
    assert ids.mismatches == 1 and ids.kl_divergence is None
    assert score.kl_divergence is None and score.top1_agreement is None and score.max_abs_error == 0.5
    assert drift.max_abs_error == 0.5


def test_report_dict_is_json_and_its_summary_names_the_metrics():
    ref = np.array([[0.0, 1.0, 2.0]])
    drift = measure([({"logits": ref}, {"logits": ref[:, ::-1].copy()}, 1)])
    data = json.loads(json.dumps(drift.to_dict()))
    assert data["samples"] == 1 and data["outputs"][0]["top1_agreement"] == 0.0
    assert not any(key.startswith("_") for key in data["outputs"][0])
    lines = summary_lines(data)
    assert "1 calibration samples" in lines[0] and "not an equivalence check" in lines[0]
    assert "KL" in lines[1] and "top-1 agreement 0.00%" in lines[1] and "max abs 2" in lines[1]
    assert lines == drift.summary_lines()


def test_missing_or_reshaped_candidate_outputs_are_errors():
    with pytest.raises(ValueError, match="no output 'y'"):
        Drift().add({"y": np.zeros(2)}, {"z": np.zeros(2)}, 1)
    with pytest.raises(ValueError, match="shapes differ"):
        Drift().add({"y": np.zeros(2)}, {"y": np.zeros(3)}, 1)
