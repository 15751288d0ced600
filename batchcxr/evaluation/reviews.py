"""How the models do on this hospital's images: study results against reviewers' verdicts.

Only the reviewed studies are read (by id, a chunk at a time), so the cost follows the number of
verdicts, not the archive. Besides the calls at each model's threshold, the probabilities a
reader sees (calibrated where the model has a calibration, else raw) are checked against the
verdicts: a calibration fitted on the training data's validation split need not hold at another
site (README: Models), and this is how a site finds out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from batchcxr.evaluation.metrics import brier_score, expected_calibration_error, roc_auc
from batchcxr.report.render import ModelResult, StudyView, study_view
from batchcxr.store.repo import Store

CALIBRATION_BINS = 10


@dataclass
class _Tally:
    """One model's calls and shown probabilities over the reviewed studies."""

    counts: dict[str, int] = field(default_factory=lambda: {"tp": 0, "fp": 0, "tn": 0, "fn": 0})
    truth: list[int] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    raw_only: int = 0
    """Studies whose probability had no calibration (older predictions, uncalibrated models)."""


def shown(r: ModelResult) -> float:
    """The probability a reader sees for a result: calibrated where there is a calibration."""
    return r.calibrated if r.calibrated is not None else r.probability


def shown_results(view: StudyView) -> dict[str, ModelResult]:
    """Per model, the study's result as a reader sees it: of its scored frontal images, the one
    with the highest shown probability (its call, version and probability)."""
    out: dict[str, ModelResult] = {}
    for image in view.images:
        if image.status != "scored" or not image.frontal:
            continue
        for r in image.results:
            if r.name not in out or shown(r) > shown(out[r.name]):
                out[r.name] = r
    return out


def _summary(t: _Tally) -> dict[str, Any]:
    c = t.counts
    n = sum(c.values())
    pos, neg = c["tp"] + c["fn"], c["tn"] + c["fp"]
    y, p = np.array(t.truth), np.array(t.probabilities)
    both = 0 < int(y.sum()) < len(y)
    return {
        **c, "n": n,
        "accuracy": (c["tp"] + c["tn"]) / n if n else None,
        "sensitivity": c["tp"] / pos if pos else None,
        "specificity": c["tn"] / neg if neg else None,
        "auc": roc_auc(y, p) if both else None,
        "ece": expected_calibration_error(y, p, CALIBRATION_BINS) if len(y) else None,
        "brier": brier_score(y, p) if len(y) else None,
        "mean_probability": float(p.mean()) if len(p) else None,
        "observed": float(y.mean()) if len(y) else None,
        "raw_only": t.raw_only,
    }


def judged(store: Store) -> tuple[dict[int, bool], int]:
    """Each study's latest verdict where it is yes or no (True: pneumonia), by study id, and how
    many studies' latest verdict is uncertain (left out)."""
    latest = store.latest_verdicts()
    truths = {sid: v.verdict == "yes" for sid, v in latest.items() if v.verdict != "uncertain"}
    return truths, len(latest) - len(truths)


def against_reviews(store: Store, lateral_views: tuple[str, ...]) -> dict[str, Any]:
    """Per model and version, over studies whose latest verdict is yes or no (PNEUMONIA / NORMAL):
    counts, accuracy / sensitivity / specificity of the calls, and AUC, expected calibration error,
    Brier score, mean and observed share of pneumonia of the probabilities shown (``shown_results``)."""
    truths, uncertain = judged(store)
    tallies: dict[tuple[str, str], _Tally] = {}
    for study in store.iter_studies_by_id(list(truths)):
        truth = truths[study.id]
        for model, r in shown_results(study_view(study, lateral_views)).items():
            t = tallies.setdefault((model, r.version), _Tally())  # a retrained model counts apart
            called = r.label == "PNEUMONIA"
            t.counts[("t" if called == truth else "f") + ("p" if called else "n")] += 1
            t.truth.append(int(truth))
            t.probabilities.append(shown(r))
            t.raw_only += r.calibrated is None
    return {"uncertain_left_out": uncertain,
            "models": [{"model": model, "version": version, **_summary(t)}
                       for (model, version), t in sorted(tallies.items())]}


def format_review_metrics(r: dict[str, Any]) -> str:
    if not r["models"]:
        return f"no reviewed studies with a yes/no verdict ({r['uncertain_left_out']} uncertain)"
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"{'model':<14} {'studies':>7} {'accuracy':>9} {'sensitivity':>12} {'specificity':>12}   TP FP TN FN"
             "   version"]
    for m in r["models"]:
        lines.append(f"{m['model']:<14} {m['n']:>7} {fmt(m['accuracy']):>9} {fmt(m['sensitivity']):>12} "
                     f"{fmt(m['specificity']):>12}   {m['tp']} {m['fp']} {m['tn']} {m['fn']}   {m['version']}")
    lines.append("")
    lines.append("the probabilities readers see (calibrated where the model has a calibration), "
                 "against the verdicts:")
    lines.append(f"{'model':<14} {'AUC':>7} {'ECE':>7} {'Brier':>7} {'mean P':>7} {'observed':>9}")
    for m in r["models"]:
        raw = f"   ({m['raw_only']} uncalibrated)" if m["raw_only"] else ""
        lines.append(f"{m['model']:<14} {fmt(m['auc']):>7} {fmt(m['ece']):>7} {fmt(m['brier']):>7} "
                     f"{fmt(m['mean_probability']):>7} {fmt(m['observed']):>9}{raw}")
    lines.append("mean P well above (below) observed: the shown probabilities run high (low) at this site; "
                 "ECE over 10 equal-width bins, noisy below a few hundred studies; each model version counts apart")
    lines.append(f"uncertain verdicts left out: {r['uncertain_left_out']}")
    lines.append("to refit a model's calibration on these studies: "
                 "batchcxr calibrate --model MODEL_FOLDER --from-reviews NEW_FOLDER")
    return "\n".join(lines)
