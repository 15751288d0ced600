"""How the models do on this hospital's images: study results against reviewers' verdicts."""

from __future__ import annotations

from typing import Any

from batchcxr.report.render import study_view
from batchcxr.store.repo import Store


def against_reviews(store: Store, lateral_views: tuple[str, ...]) -> dict[str, Any]:
    """Per model: counts and accuracy / sensitivity / specificity over studies whose latest verdict
    is yes or no (PNEUMONIA / NORMAL)."""
    latest = store.latest_verdicts()
    per_model: dict[str, dict[str, int]] = {}
    uncertain = 0
    for study in store.studies():
        v = latest.get(study.id)
        if v is None:
            continue
        if v.verdict == "uncertain":
            uncertain += 1
            continue
        truth = v.verdict == "yes"
        view = study_view(study, lateral_views)
        for model, label in view.labels.items():
            c = per_model.setdefault(model, {"tp": 0, "fp": 0, "tn": 0, "fn": 0})
            called = label == "PNEUMONIA"
            c[("t" if called == truth else "f") + ("p" if called else "n")] += 1
    out: dict[str, Any] = {"uncertain_left_out": uncertain, "models": {}}
    for model, c in sorted(per_model.items()):
        n = sum(c.values())
        pos, neg = c["tp"] + c["fn"], c["tn"] + c["fp"]
        out["models"][model] = {
            **c, "n": n,
            "accuracy": (c["tp"] + c["tn"]) / n if n else None,
            "sensitivity": c["tp"] / pos if pos else None,
            "specificity": c["tn"] / neg if neg else None,
        }
    return out


def format_review_metrics(r: dict[str, Any]) -> str:
    if not r["models"]:
        return f"no reviewed studies with a yes/no verdict ({r['uncertain_left_out']} uncertain)"
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"{'model':<14} {'studies':>7} {'accuracy':>9} {'sensitivity':>12} {'specificity':>12}   TP FP TN FN"]
    for model, m in r["models"].items():
        lines.append(f"{model:<14} {m['n']:>7} {fmt(m['accuracy']):>9} {fmt(m['sensitivity']):>12} "
                     f"{fmt(m['specificity']):>12}   {m['tp']} {m['fp']} {m['tn']} {m['fn']}")
    lines.append(f"uncertain verdicts left out: {r['uncertain_left_out']}")
    return "\n".join(lines)
