"""Model cards: the JSON record beside each shipped model, and its Markdown view.

``models/NAME/card.json`` is the single source of truth about a model: what it
is, how its input must be prepared, its decision threshold and how that was
chosen, what it was trained on and how it measured. Scoring reads the
threshold and version from it; ``card.md`` is rendered from it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CARD_JSON = "card.json"
CARD_MD = "card.md"
WEIGHTS_FILE = "model.keras"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_version(name: str, weights_sha256: str, calibration: dict | None = None) -> str:
    """A version string that changes whenever the weights (or the calibration) change."""
    version = f"{name}-{weights_sha256[:12]}"
    if calibration:
        tag = hashlib.sha256(f"{calibration['a']:.6f},{calibration['b']:.6f}".encode()).hexdigest()[:4]
        version += f"-c{tag}"
    return version


def read_card(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / CARD_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model card not found")
    return json.loads(path.read_text())


def write_card(model_dir: Path, card: dict[str, Any]) -> None:
    """Write card.json and card.md atomically (temp file + rename)."""
    model_dir = Path(model_dir)
    for name, text in ((CARD_JSON, json.dumps(card, indent=2, sort_keys=False) + "\n"), (CARD_MD, render_markdown(card))):
        tmp = model_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(model_dir / name)


def _metrics_table(m: dict[str, Any] | None) -> str:
    if not m:
        return "_not measured yet: run `batchcxr evaluate --update-card`_\n"
    cm = m["confusion_matrix"]["rows_true_cols_predicted"]
    lines = [
        f"- images: {m['n']}, threshold {m['threshold']}",
        f"- accuracy **{m['accuracy']:.4f}**, ROC AUC **{m['roc_auc']:.4f}**",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for name, c in m["per_class"].items():
        lines.append(f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
    lines += [
        "",
        f"Confusion matrix (rows true, columns predicted NORMAL / PNEUMONIA): {cm}",
    ]
    return "\n".join(lines) + "\n"


def evidence_lines(m: dict[str, Any] | None) -> list[str]:
    """Calibration, Grad-CAM-in-lungs and quality-gate lines of one evaluation, as `batchcxr evaluate`
    prints them and the card shows them (empty when it has none of these)."""
    if not m:
        return []
    lines = []
    cal = m.get("calibration")
    if cal:
        line = f"- calibration: raw ECE {cal['raw']['ece']:.4f}, Brier {cal['raw']['brier']:.4f}"
        if "calibrated" in cal:
            line += f"; calibrated ECE {cal['calibrated']['ece']:.4f}, Brier {cal['calibrated']['brier']:.4f}"
        lines.append(line + ("" if "calibrated" in cal else " (no calibration in the card)"))
    g = m.get("gradcam")
    if g and not g["n"]:
        lines.append(f"- Grad-CAM: no map with evidence anywhere ({g.get('no_evidence', 0)} maps)")
    elif g:
        lines.append(f"- Grad-CAM mass inside the lung fields: mean {g['mass_in_lungs_mean']:.3f}, median "
                     f"{g['mass_in_lungs_median']:.3f}, {g['share_with_70pct_in_lungs']:.1%} of maps with >= 70 % "
                     f"inside ({g['n']} maps; {g.get('no_evidence', 0)} with no evidence anywhere left out)")
        if g.get("mass_in_undilated_lungs_mean") is not None:
            lines.append(f"- Grad-CAM mass inside the lung fields as segmented (not dilated, stricter): mean "
                         f"{g['mass_in_undilated_lungs_mean']:.3f}, median {g['mass_in_undilated_lungs_median']:.3f}")
        lines.append("- Grad-CAM peaks: " + ", ".join(f"{k} {v}" for k, v in sorted(g["peak_regions"].items())))
        for name, c in g["by_class"].items():
            if c["n"]:
                undilated = c.get("mass_in_undilated_lungs_mean")
                lines.append(f"  - {name}: mass inside {c['mass_in_lungs_mean']:.3f}"
                             + (f" (undilated {undilated:.3f})" if undilated is not None else "")
                             + ", peak in the top-left sixteenth "
                             f"{c['peak_in_top_left_sixteenth']:.1%}, peaks "
                             + ", ".join(f"{k} {v}" for k, v in sorted(c["peak_regions"].items()))
                             + f"; no evidence {c.get('no_evidence', 0)}")
    o = m.get("occlusion")
    if o:
        lines.append(f"- occlusion ({o['filled_with']}; ROC AUC as is {o['as_is']['roc_auc']:.4f}): only the lungs "
                     f"left: AUC {o['lungs_only']['roc_auc']:.4f}, mean |logit change| "
                     f"{o['lungs_only']['mean_abs_logit_change']:.2f}; only what lies outside them left: AUC "
                     f"{o['outside_only']['roc_auc']:.4f}, mean |logit change| "
                     f"{o['outside_only']['mean_abs_logit_change']:.2f}")
    q = m.get("quality_gate")
    if q:
        lines.append(f"- quality gate: {q['refused']} of {q['of']} refused as not frontal chest radiographs")
    s = m.get("shifted")
    if s:  # batchcxr evaluate --shift-copies
        ece = f"ECE raw {s['ece_raw']:.4f}" + (f", calibrated {s['ece_calibrated']:.4f}" if "ece_calibrated" in s else "")
        lines.append(f"- {s['copies']} shifted copies of each image (seed {s['seed']}; exposure, contrast, blur, noise): "
                     f"ROC AUC {s['roc_auc']:.4f}, accuracy {s['accuracy']:.4f}, recall NORMAL "
                     f"{s['recall']['NORMAL']:.4f} / PNEUMONIA {s['recall']['PNEUMONIA']:.4f}, {ece}")
    return lines + [""] if lines else []


def _calibration_line(c: dict[str, Any]) -> str:
    line = (f"**Calibration.** {c['method']} fitted on {c.get('fitted_on', 'validation')}: "
            f"a={c['a']:.4f}, b={c['b']:.4f} ({c['formula']}); the threshold on that scale is "
            f"{c['threshold_calibrated']:.4f}.")
    shift = c.get("shift")
    if shift:  # batchcxr calibrate --shift-copies
        line += (f" ECE on the validation split {c['validation_ece_before']:.4f} raw, {c['validation_ece_after']:.4f} "
                 f"calibrated; on its {shift['copies']} shifted copies of each film {shift['ece_before']:.4f} -> "
                 f"{shift['ece_after']:.4f}.")
    h = c.get("site_heldout")
    if h:  # batchcxr calibrate --from-reviews
        line += (f" On held-out reviewed studies ({h['folds']} folds): ECE {h['ece_in_use']:.4f} with the "
                 f"calibration it replaced, {h['ece_refit']:.4f} refitted; Brier {h['brier_in_use']:.4f} -> "
                 f"{h['brier_refit']:.4f}. The test metrics below were measured with the calibration it replaced.")
    return line


def render_lungs_markdown(card: dict[str, Any]) -> str:
    """The Markdown view of the lung segmenter's card."""
    d = card["held_out_dice"]
    data = card["training_data"]
    return "\n".join([
        f"# Model card: {card['name']} ({card['version']})",
        "",
        "_Lung-field segmenter. Research software, not for diagnostic use._",
        "",
        f"**Architecture.** {card['architecture']['summary']} ({card['architecture']['parameters']:,} parameters).",
        "",
        "**Input and output.** " + "; ".join(f"{k}: {v}" for k, v in card["preprocessing"].items()),
        "",
        f"**Training data and attribution.** {data['source']} {data['pairs']} pairs: {data['train']} trained on, "
        f"{len(data['held_out'])} held out ({data['split']}). Credit each image's source as {data['attribution_file']} "
        "lists it.",
        "",
        f"**Held-out Dice** (cleaned mask against the human mask at the segmenter's resolution, {d['n']} pairs): "
        f"mean **{d['mean']:.4f}**, median {d['median']:.4f}, min {d['min']:.4f}.",
        "",
        *([f"**Paediatric check (Kaggle images, by eye).** {card['paediatric_check']}", ""]
          if card.get("paediatric_check") else []),
        "**Hyper-parameters.** " + ", ".join(f"{k}={v}" for k, v in card["hyperparameters"].items()),
        "",
        f"**Weights.** `{card['weights']['file']}`, sha256 `{card['weights']['sha256']}`.",
        "",
        f"**Scoring graph.** `{card['scoring']['file']}`, sha256 `{card['scoring']['sha256']}`; "
        f"{card['scoring']['runtime']}; {card['scoring']['outputs']}.",
        "",
        "**Libraries.** " + ", ".join(f"{k} {v}" for k, v in card["library_versions"].items()),
        "",
        f"Created {card['created']}.",
        "",
    ])


def render_markdown(card: dict[str, Any]) -> str:
    """A short human-readable view of card.json."""
    if card.get("model") == "lungs":
        return render_lungs_markdown(card)
    t = card["threshold"]
    data = card["training_data"]
    test = card.get("test_metrics")
    parts = [
        f"# Model card: {card['name']} ({card['version']})",
        "",
        "_Research software, not for diagnostic use._",
        "",
        f"**Architecture.** {card['architecture']['summary']} "
        f"({card['architecture']['parameters']:,} parameters).",
        "",
        "**Input (preprocessing contract).** "
        + "; ".join(f"{k}: {v}" for k, v in card["preprocessing"].items()),
        "",
        f"**Threshold.** {t['value']:.4f}: {t['rule']} on {t['chosen_on']}.",
        "",
        f"**Training data.** {data['source']}. Train {data['train_counts']}, validation "
        f"{data['val_counts']} ({data['split']}); file list sha256 `{data['file_list_sha256'][:16]}...`.",
        "",
        "**Hyper-parameters.** " + ", ".join(f"{k}={v}" for k, v in card["hyperparameters"].items()),
        "",
        *([f"**Why this model ships.** {card['selection']}", ""] if card.get("selection") else []),
        *([_calibration_line(card["calibration"]), ""] if card.get("calibration") else []),
        "## Validation (patient-level split of train)",
        _metrics_table(card.get("validation_metrics")),
        *evidence_lines(card.get("validation_evaluation")),
        "## Test (Kaggle test split, as printed by `batchcxr evaluate`)",
        _metrics_table(test),
        *evidence_lines(test),
    ]
    if test and test.get("command"):
        parts += [f"Command: `{test['command']}`", ""]
    parts += [
        f"**Weights.** `{card['weights']['file']}`, sha256 `{card['weights']['sha256']}`.",
        "",
        *(
            [f"**Scoring graph.** `{card['scoring']['file']}`, sha256 `{card['scoring']['sha256']}`; "
             f"{card['scoring']['runtime']}; {card['scoring']['outputs']}.", ""]
            if card.get("scoring") else []
        ),
        "**Libraries.** " + ", ".join(f"{k} {v}" for k, v in card["library_versions"].items()),
        "",
        f"Created {card['created']}.",
        "",
    ]
    return "\n".join(parts)
