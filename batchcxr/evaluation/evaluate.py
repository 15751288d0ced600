"""`batchcxr evaluate`: a model against a labelled Kaggle-layout split, at its card's threshold.

It runs what scoring runs - the ONNX scoring graph under ONNX Runtime, with the card's lung-field
contract and calibration - and reports, besides accuracy and AUC, where the model looks (Grad-CAM
mass inside the lung fields, where the peaks fall; the AUC with only the lungs, or only the rest, of
each input left), how well its probabilities are calibrated
(ECE, Brier score, a reliability plot) and how many images the quality gate would refuse.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from batchcxr.evaluation.explain import (
    OCCLUSIONS,
    gradcam_lung_metrics,
    occluded,
    occlusion_metrics,
)
from batchcxr.evaluation.metrics import (
    CLASS_NAMES,
    binary_metrics,
    brier_score,
    confusion_matrix,
    expected_calibration_error,
    reliability,
    roc_curve,
)
from batchcxr.modelcard import evidence_lines, read_card, write_card
from batchcxr.normalize.lungfield import check_lungs, lungs_in_input
from batchcxr.paths import MODELS_DIR
from batchcxr.training.data import file_list_sha256, list_split, load_images

log = logging.getLogger(__name__)


@dataclass
class ModelRun:
    """A scoring model's outputs on labelled images (run_arrays)."""

    outputs: list
    boxes: list
    lung_probs: np.ndarray
    y: np.ndarray
    occluded: dict[str, np.ndarray] = field(default_factory=dict)
    """Raw probabilities of each OCCLUSIONS copy of the inputs (explain.occluded), when asked for."""

    @property
    def raw(self) -> np.ndarray:
        """Each image's raw (uncalibrated) probability."""
        return np.array([o.probability for o in self.outputs])


def run_arrays(model, x: np.ndarray, y: np.ndarray, lung_dir: Path = MODELS_DIR / "lungs", batch_size: int = 32,
               occlusions: bool = False) -> ModelRun:
    """A scoring model's outputs on labelled uint8 (N, 224, 224, 1) images as scoring makes them
    (lung contract, then equalization inside ``run``), with ``occlusions`` also on each
    OCCLUSIONS copy of the inputs."""
    from batchcxr.infer.lungs import load_lung_model

    lung = load_lung_model(lung_dir, threads=2)
    x_in, boxes, lung_probs = lung.transform(x, model.lungs)

    def run(inputs):
        out = []
        for i in range(0, len(inputs), batch_size):
            out += model.run(inputs[i : i + batch_size], boxes[i : i + batch_size])
        return out

    done = ModelRun(run(x_in), boxes, lung_probs, y)
    if occlusions:
        lungs = np.stack([lungs_in_input(p, model.lungs, x_in.shape[1]) for p in lung_probs])
        done.occluded = {keep: np.array([o.probability for o in run(occluded(x_in, lungs, keep))])
                         for keep in OCCLUSIONS}
    return done


def evaluate(model_dir: Path, data_dir: Path, batch_size: int = 32, *, validation: bool = False,
             lung_dir: Path = MODELS_DIR / "lungs", shift_copies: int = 0,
             shift_seed: int = 0) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Score every image of DIR/{NORMAL,PNEUMONIA} (or, with ``validation``, the card's
    patient-level validation split of the train folder DIR); return metrics, labels and the
    probabilities (calibrated when the card has a calibration). With ``shift_copies``, also
    the figures on that many shifted copies of each image (``shifted_metrics``)."""
    from batchcxr.infer.runtime import load_scoring_model
    from batchcxr.training.threshold import validation_split

    card = read_card(model_dir)
    model = load_scoring_model(model_dir, threads=2)
    items = validation_split(card, Path(data_dir)) if validation else list_split(data_dir)
    x, y = load_images(items)
    done = run_arrays(model, x, y, lung_dir, batch_size, occlusions=True)
    outputs, boxes, lung_probs, y = done.outputs, done.boxes, done.lung_probs, done.y
    raw = done.raw
    metrics = binary_metrics(y, raw, model.threshold)
    metrics["model"] = model.name
    metrics["model_version"] = model.version
    metrics["data"] = "validation split of " + Path(data_dir).name if validation else Path(data_dir).name
    metrics["file_list_sha256"] = file_list_sha256(items, Path(data_dir))
    metrics["calibration"] = {"raw": {"ece": round(expected_calibration_error(y, raw), 4),
                                      "brier": round(brier_score(y, raw), 4)}}
    scores = raw
    if model.calibration is not None:
        scores = np.array([o.calibrated for o in outputs])
        metrics["calibration"]["calibrated"] = {"ece": round(expected_calibration_error(y, scores), 4),
                                                "brier": round(brier_score(y, scores), 4),
                                                "a": model.calibration[0], "b": model.calibration[1]}
    metrics["calibration"]["reliability"] = reliability(y, scores)
    metrics["gradcam"] = gradcam_lung_metrics([o.heatmap for o in outputs], boxes, lung_probs, y)
    metrics["occlusion"] = occlusion_metrics(y, raw, done.occluded)
    refused = [r for r in (check_lungs(p)[1].reason() for p in lung_probs) if r]
    metrics["quality_gate"] = {"refused": len(refused), "of": len(y), "reasons": sorted(set(refused))[:5]}
    if shift_copies:
        metrics["shifted"] = shifted_metrics(model, x, y, shift_copies, shift_seed, lung_dir, batch_size)
    return metrics, y, scores


def run_shifted(model, x: np.ndarray, y: np.ndarray, copies: int, seed: int,
                lung_dir: Path = MODELS_DIR / "lungs", batch_size: int = 32) -> ModelRun:
    """``run_arrays`` on ``copies`` shifted copies of each image (evaluation/shift.py: films as
    other equipment might make them), with their labels."""
    from batchcxr.evaluation.shift import shifted_copies

    return run_arrays(model, shifted_copies(x, copies, seed), np.tile(y, copies), lung_dir, batch_size)


def shifted_metrics(model, x: np.ndarray, y: np.ndarray, copies: int, seed: int,
                    lung_dir: Path = MODELS_DIR / "lungs", batch_size: int = 32) -> dict[str, Any]:
    """AUC, accuracy, recalls and ECE on ``copies`` shifted copies of each image (run_shifted).
    On the validation split, where every candidate's AUC sits near 0.995, these figures still
    tell models apart."""
    from batchcxr.evaluation.shift import ShiftRanges

    done = run_shifted(model, x, y, copies, seed, lung_dir, batch_size)
    ys, raw, outputs = done.y, done.raw, done.outputs
    m = binary_metrics(ys, raw, model.threshold)
    shifted = {"copies": copies, "seed": seed, "ranges": ShiftRanges().as_dict(), "n": m["n"],
               "roc_auc": m["roc_auc"], "accuracy": m["accuracy"],
               "recall": {name: c["recall"] for name, c in m["per_class"].items()},
               "ece_raw": round(expected_calibration_error(ys, raw), 4)}
    if model.calibration is not None:
        calibrated = np.array([o.calibrated for o in outputs])
        shifted["ece_calibrated"] = round(expected_calibration_error(ys, calibrated), 4)
    return shifted


def format_metrics(m: dict[str, Any]) -> str:
    """The text `batchcxr evaluate` prints."""
    cm = m["confusion_matrix"]["rows_true_cols_predicted"]
    lines = [
        f"model {m['model']} ({m['model_version']}) on {m['data']}: {m['n']} images, threshold {m['threshold']:.4f}",
        f"accuracy  {m['accuracy']:.4f}",
        f"ROC AUC   {m['roc_auc']:.4f}",
        f"{'class':<10} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}",
    ]
    for name, c in m["per_class"].items():
        lines.append(f"{name:<10} {c['precision']:>9.4f} {c['recall']:>7.4f} {c['f1']:>7.4f} {c['support']:>8}")
    lines += [
        "confusion matrix (rows true, columns predicted)",
        f"{'':<10} {'NORMAL':>9} {'PNEUMONIA':>9}",
        f"{'NORMAL':<10} {cm[0][0]:>9} {cm[0][1]:>9}",
        f"{'PNEUMONIA':<10} {cm[1][0]:>9} {cm[1][1]:>9}",
    ]
    lines += evidence_lines(m)
    return "\n".join(lines)


def save_plots(y: np.ndarray, scores: np.ndarray, threshold: float, title: str, out_dir: Path) -> list[Path]:
    """ROC curve and confusion matrix as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fpr, tpr, _ = roc_curve(y, scores)
    cm = confusion_matrix(y, scores, threshold)

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, lw=2)
    ax.plot([0, 1], [0, 1], ls="--", c="grey")
    op_fpr = cm[0, 1] / max(cm[0].sum(), 1)
    op_tpr = cm[1, 1] / max(cm[1].sum(), 1)
    ax.scatter([op_fpr], [op_tpr], c="red", zorder=3, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="1 - specificity (NORMAL called PNEUMONIA)", ylabel="sensitivity (PNEUMONIA recall)", title=f"ROC: {title}")
    ax.legend(loc="lower right")
    roc_png = out_dir / "roc.png"
    fig.tight_layout()
    fig.savefig(roc_png, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black", fontsize=14)
    ax.set_xticks([0, 1], CLASS_NAMES)
    ax.set_yticks([0, 1], CLASS_NAMES)
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion: {title}")
    cm_png = out_dir / "confusion_matrix.png"
    fig.tight_layout()
    fig.savefig(cm_png, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    bins = [b for b in reliability(y, scores) if b["n"]]
    ax.plot([0, 1], [0, 1], ls="--", c="grey", label="perfect calibration")
    ax.plot([b["mean_probability"] for b in bins], [b["observed"] for b in bins], "o-", lw=2,
            label=f"ECE {expected_calibration_error(y, scores):.3f}")
    for b in bins:
        ax.annotate(str(b["n"]), (b["mean_probability"], b["observed"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=8, color="grey")
    ax.set(xlabel="predicted P(pneumonia)", ylabel="observed share with pneumonia", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability: {title}")
    ax.legend(loc="upper left")
    rel_png = out_dir / "reliability.png"
    fig.tight_layout()
    fig.savefig(rel_png, dpi=100)
    plt.close(fig)
    return [roc_png, cm_png, rel_png]


def write_results(metrics: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path


def update_card(model_dir: Path, metrics: dict[str, Any], command: str, key: str = "test_metrics") -> None:
    """Put the metrics evaluate printed into the model card, with the command that made them."""
    card = read_card(model_dir)
    card[key] = {**metrics, "command": command}
    write_card(model_dir, card)
