import numpy as np
import pytest

from batchcxr.evaluation.metrics import binary_metrics, choose_threshold, confusion_matrix, roc_auc, roc_curve

# Hand-computed example: 3 normals (0.1, 0.4, 0.6), 4 pneumonias (0.35, 0.7, 0.8, 0.9).
Y = np.array([0, 0, 0, 1, 1, 1, 1])
S = np.array([0.1, 0.4, 0.6, 0.35, 0.7, 0.8, 0.9])


def test_confusion_matrix_at_half():
    # predicted 1 for 0.6, 0.7, 0.8, 0.9 -> TN=2, FP=1, FN=1 (0.35), TP=3
    assert confusion_matrix(Y, S, 0.5).tolist() == [[2, 1], [1, 3]]


def test_auc_by_pair_counting():
    # pairs (pos > neg): 0.35 beats 0.1 only (1); 0.7, 0.8, 0.9 beat all three (9) -> 10 / 12
    assert roc_auc(Y, S) == pytest.approx(10 / 12)


def test_auc_ties_count_half():
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)


def test_binary_metrics_hand_computed():
    m = binary_metrics(Y, S, 0.5)
    assert m["accuracy"] == pytest.approx(round(5 / 7, 4))
    assert m["per_class"]["PNEUMONIA"] == {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    assert m["per_class"]["NORMAL"]["precision"] == pytest.approx(round(2 / 3, 4))
    assert m["per_class"]["NORMAL"]["recall"] == pytest.approx(round(2 / 3, 4))
    assert m["roc_auc"] == pytest.approx(round(10 / 12, 4))


def test_roc_curve_ends():
    fpr, tpr, _ = roc_curve(Y, S)
    assert (fpr[0], tpr[0]) == (0, 0) and (fpr[-1], tpr[-1]) == (1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_youden_threshold_sits_between_scores():
    # best J: threshold in (0.6, 0.7] -> TPR 3/4, FPR 0 -> J 0.75; midpoint 0.65
    assert choose_threshold(Y, S, "youden") == pytest.approx(0.65)


def test_recall_rule():
    assert choose_threshold(Y, S, "recall:1.0") == pytest.approx(0.35)


def test_bad_rule():
    with pytest.raises(ValueError, match="unknown threshold rule"):
        choose_threshold(Y, S, "magic")


def test_eer_threshold_balances_errors():
    # logit-symmetric classes: equal error point at p = 0.5
    y = np.array([0] * 5 + [1] * 5)
    s = np.array([0.05, 0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9, 0.95])
    t = choose_threshold(y, s, "eer")
    assert 0.4 < t <= 0.6
    cm = confusion_matrix(y, s, t)
    assert cm[0, 1] == cm[1, 0]  # as many false positives as false negatives


def test_eer_separable_sits_between_classes():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.8, 0.9])
    t = choose_threshold(y, s, "eer")
    assert 0.2 < t <= 0.8


def _lung_probability() -> np.ndarray:
    """A segmenter map with two lung-shaped blobs (the left and right thirds, rows 20-80 %)."""
    from batchcxr.normalize.lungfield import LUNG_SIZE

    p = np.zeros((LUNG_SIZE, LUNG_SIZE), np.float32)
    r0, r1 = int(0.2 * LUNG_SIZE), int(0.8 * LUNG_SIZE)
    p[r0:r1, int(0.15 * LUNG_SIZE):int(0.42 * LUNG_SIZE)] = 1
    p[r0:r1, int(0.58 * LUNG_SIZE):int(0.85 * LUNG_SIZE)] = 1
    return p


def test_gradcam_metrics_leave_out_maps_without_evidence():
    """An all-zero map (no evidence for pneumonia anywhere) has no peak and no mass: it must not count
    as 0 % inside the lungs, nor as a peak in the top-left corner (argmax of zeros)."""
    from batchcxr.evaluation.explain import gradcam_lung_metrics
    from batchcxr.normalize.lungfield import FULL_BOX

    inside = np.zeros((7, 7), np.float32)
    inside[3, 1] = 1.0  # left lung
    empty = np.zeros((7, 7), np.float32)
    probs = np.stack([_lung_probability()] * 3)
    g = gradcam_lung_metrics([inside, empty, inside], [FULL_BOX] * 3, probs, np.array([1, 0, 0]))
    assert g["n"] == 2 and g["no_evidence"] == 1
    assert g["peak_regions"] == {"lung": 2}
    assert g["by_class"]["NORMAL"]["no_evidence"] == 1 and g["by_class"]["NORMAL"]["n"] == 1
    assert g["by_class"]["NORMAL"]["peak_in_top_left_sixteenth"] == 0.0
    assert g["mass_in_lungs_mean"] > 0.5


def test_gradcam_metrics_count_a_corner_peak():
    from batchcxr.evaluation.explain import gradcam_lung_metrics
    from batchcxr.normalize.lungfield import FULL_BOX

    corner = np.zeros((7, 7), np.float32)
    corner[0, 0] = 1.0
    g = gradcam_lung_metrics([corner], [FULL_BOX], _lung_probability()[None], np.array([1]))
    assert g["no_evidence"] == 0 and g["peak_regions"] == {"corner": 1}
    assert g["by_class"]["PNEUMONIA"]["peak_in_top_left_sixteenth"] == 1.0
    assert g["mass_in_lungs_mean"] < 0.3


def test_gradcam_metrics_stricter_without_dilation():
    """Evidence on the mediastinum just beside a lung counts partly inside the dilated fields but
    less inside the fields as segmented; evidence deep in a lung counts fully in both."""
    from batchcxr.evaluation.explain import gradcam_lung_metrics
    from batchcxr.modelcard import evidence_lines
    from batchcxr.normalize.lungfield import FULL_BOX

    beside = np.zeros((28, 28), np.float32)
    beside[14, 12] = 1.0  # the first column of the gap between the lungs (columns 42-58 %)
    deep = np.zeros((28, 28), np.float32)
    deep[14, 8] = 1.0  # the middle of the left lung
    probs = _lung_probability()[None]
    g_beside = gradcam_lung_metrics([beside], [FULL_BOX], probs, np.array([1]))
    g_deep = gradcam_lung_metrics([deep], [FULL_BOX], probs, np.array([1]))
    assert g_beside["mass_in_undilated_lungs_mean"] < g_beside["mass_in_lungs_mean"] - 0.2
    assert g_deep["mass_in_undilated_lungs_mean"] == g_deep["mass_in_lungs_mean"] == 1.0
    assert g_beside["by_class"]["PNEUMONIA"]["mass_in_undilated_lungs_mean"] == g_beside["mass_in_undilated_lungs_mean"]
    assert any("as segmented (not dilated, stricter)" in line for line in evidence_lines({"gradcam": g_beside}))


def test_gradcam_metrics_with_no_evidence_at_all():
    from batchcxr.evaluation.explain import gradcam_lung_metrics
    from batchcxr.modelcard import evidence_lines
    from batchcxr.normalize.lungfield import FULL_BOX

    g = gradcam_lung_metrics([np.zeros((7, 7), np.float32)], [FULL_BOX], _lung_probability()[None], np.array([0]))
    assert g["n"] == 0 and g["no_evidence"] == 1 and g["mass_in_lungs_mean"] is None
    assert g["by_class"]["NORMAL"]["mass_in_lungs_mean"] is None
    assert evidence_lines({"gradcam": g}) == ["- Grad-CAM: no map with evidence anywhere (1 maps)", ""]


def test_occluded_fills_one_part_with_the_inputs_own_mean_grey():
    from batchcxr.evaluation.explain import occluded

    x = np.zeros((2, 4, 4, 1), np.uint8)
    x[0, :, :2] = 200  # image 0: bright left half, mean 100
    x[1] = 30
    lungs = np.zeros((2, 4, 4), np.uint8)
    lungs[:, 1:3, :2] = 1
    only_lungs = occluded(x, lungs, "lungs_only")
    assert (only_lungs[0][lungs[0] == 1] == 200).all() and (only_lungs[0][lungs[0] == 0] == 100).all()
    only_outside = occluded(x, lungs, "outside_only")
    assert (only_outside[0][lungs[0] == 1] == 100).all() and (only_outside[0][lungs[0] == 0] == x[0][lungs[0] == 0]).all()
    assert (occluded(x, lungs, "lungs_only")[1] == 30).all()  # a flat image stays as it was
    assert x[0, 0, 0, 0] == 200  # the inputs are not changed in place


def test_occlusion_metrics_tell_a_lung_reader_from_a_shortcut():
    """The probabilities of a model that reads the lungs survive filling the outside and not
    filling the lungs; the printed line names both AUCs."""
    from batchcxr.evaluation.explain import occlusion_metrics
    from batchcxr.modelcard import evidence_lines

    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.8, 0.9])
    m = occlusion_metrics(y, p, {"lungs_only": p, "outside_only": np.array([0.5, 0.6, 0.5, 0.4])})
    assert m["lungs_only"] == {"roc_auc": 1.0, "mean_abs_logit_change": 0.0}
    assert m["outside_only"]["roc_auc"] == 0.125 and m["outside_only"]["mean_abs_logit_change"] > 1
    line = next(x for x in evidence_lines({"occlusion": m}) if x.startswith("- occlusion"))
    assert "only the lungs left: AUC 1.0000" in line and "outside them left: AUC 0.1250" in line


def test_review_probability_is_the_highest_calibrated_frontal_one():
    """What a study's reader saw: calibrated where the model has a calibration, raw where not;
    lateral and unscored images left out."""
    from batchcxr.evaluation.reviews import shown_results
    from batchcxr.report.render import ImageView, ModelResult, StudyView

    def image(frontal: bool, status: str, *results: ModelResult) -> ImageView:
        return ImageView(0, "x.dcm", status, "", "", "PA" if frontal else "LL", frontal, "", list(results))

    def result(name: str, raw: float, calibrated: float | None) -> ModelResult:
        return ModelResult(0, name, "v", raw, 0.5, "PNEUMONIA" if raw >= 0.5 else "NORMAL", "", calibrated)

    view = StudyView(id=1, key="k", slug="s", patient_name="", patient_id="", accession_number="", study_date="",
                     study_description="", images=[
        image(True, "scored", result("a", 0.9, 0.7), result("b", 0.2, None)),
        image(True, "scored", result("a", 0.8, 0.75), result("b", 0.4, None)),
        image(False, "scored", result("a", 0.99, 0.99), result("b", 0.99, None)),  # lateral
        image(True, "failed", result("a", 0.99, 0.99)),
    ])
    shown = shown_results(view)
    assert (shown["a"].probability, shown["a"].calibrated) == (0.8, 0.75)
    assert (shown["b"].probability, shown["b"].calibrated) == (0.4, None)
