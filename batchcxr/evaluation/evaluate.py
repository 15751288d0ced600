"""`batchcxr evaluate`: a model against a labelled Kaggle-layout split, at its card's threshold."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from batchcxr.evaluation.metrics import CLASS_NAMES, binary_metrics, confusion_matrix, roc_curve
from batchcxr.infer.models import LoadedModel
from batchcxr.modelcard import write_card
from batchcxr.training.data import file_list_sha256, list_split, load_images

log = logging.getLogger(__name__)


def evaluate(model: LoadedModel, data_dir: Path, batch_size: int = 32) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Score every image of DIR/{NORMAL,PNEUMONIA}; return metrics, labels and scores."""
    items = list_split(data_dir)
    x, y = load_images(items)
    scores = model.predict(x.astype(np.float32), batch_size=batch_size)
    metrics = binary_metrics(y, scores, model.threshold)
    metrics["model"] = model.name
    metrics["model_version"] = model.version
    metrics["data"] = Path(data_dir).name
    metrics["file_list_sha256"] = file_list_sha256(items, Path(data_dir))
    return metrics, y, scores


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
    return [roc_png, cm_png]


def write_results(metrics: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path


def update_card(model: LoadedModel, metrics: dict[str, Any], command: str) -> None:
    """Put the metrics evaluate printed into the model card, with the command that made them."""
    card = dict(model.card)
    card["test_metrics"] = {**metrics, "command": command}
    write_card(model.directory, card)
