"""The `batchcxr` command line. Thin: parse options, build config, call one function."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from batchcxr.signals import EARLY

EARLY.install()  # before click and everything slow: a SIGTERM during start-up is a warm stop too

import click  # noqa: E402

from batchcxr.paths import PROJECT_ROOT  # noqa: E402

DEFAULT_TFLITE = PROJECT_ROOT.parent / "shared" / "weights" / "mobilenet_v2_1.0_224_quant.tflite"
MODEL_DEFAULTS = {
    # model: (epochs, learning rate)
    "cnn": (30, 1e-3),
    "mobilenetv2": (8, 1e-4),
}

config_option = click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                             default=None, help="TOML settings file (table [batchcxr]).")
db_option = click.option("--db", "db_url", default=None,
                         help="SQLAlchemy URL or SQLite file path [default: batchcxr.sqlite].")


def _setup_logging(verbose: bool) -> None:
    """Quiet by default: batchcxr's own INFO lines, only warnings from libraries (alembic, ONNX
    Runtime, watchdog...); ``-v``: batchcxr's DEBUG lines and libraries' INFO lines."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from batchcxr.logs import SafeFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    logging.getLogger("batchcxr").setLevel(logging.DEBUG if verbose else logging.INFO)


LONG_RUNNING = {"watch", "score", "listen", "pull", "send"}
"""Commands that keep the warm-stop handlers (finish the batch in hand on SIGTERM/SIGINT)."""


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Bulk pneumonia scoring of chest X-rays. Not for diagnostic use."""
    os.umask(0o077)  # everything batchcxr writes may hold patient data: owner only
    _setup_logging(verbose)
    if ctx.invoked_subcommand not in LONG_RUNNING:
        EARLY.restore_defaults()


@main.command()
@click.option("--model", "model_name", type=click.Choice(["cnn", "mobilenetv2", "lungs"]), required=True,
              help="A classifier, or the lung-field segmenter (--data: the lung_masks_cxr256 folder).")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Kaggle layout root holding train/{NORMAL,PNEUMONIA}, or that train folder itself.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Model folder to write (weights + card), e.g. models/mobilenetv2.")
@click.option("--epochs", type=int, default=None, help="Most epochs (early stopping on validation AUC).")
@click.option("--lr", "learning_rate", type=float, default=None, help="Adam learning rate (MobileNetV2: fine-tuning).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--val-fraction", type=float, default=0.15, show_default=True)
@click.option("--patience", type=int, default=4, show_default=True)
@click.option("--zoom", type=float, default=0.15, show_default=True)
@click.option("--shear", type=float, default=0.1, show_default=True, help="Keras RandomShear factor.")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Random horizontal flips.")
@click.option("--rotation", type=float, default=0.0, show_default=True, help="RandomRotation (fraction of a turn).")
@click.option("--translation", type=float, default=0.0, show_default=True)
@click.option("--contrast", type=float, default=0.0, show_default=True, help="RandomContrast factor.")
@click.option("--brightness", type=float, default=0.0, show_default=True, help="RandomBrightness factor.")
@click.option("--shift", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Probability of a simulated acquisition shift per image (exposure, contrast, blur, noise; "
                   "evaluation/shift.py).")
@click.option("--corners", type=float, default=0.0, show_default=True,
              help="Probability of blanking each corner square (burned-in markers).")
@click.option("--centre", type=float, default=0.0, show_default=True,
              help="Probability of giving each image the central vertical band (spine, mediastinum) of another.")
@click.option("--outside", type=float, default=0.0, show_default=True,
              help="Probability of giving each image what lies outside its lung fields from another (needs --lungs).")
@click.option("--aspect", type=float, default=0.0, show_default=True,
              help="Random horizontal-only zoom: aspect-ratio jitter against the squash shortcut.")
@click.option("--lung-guidance", type=float, default=0.0, show_default=True,
              help="Weight of a loss term charging evidence outside the lung fields (needs --lungs).")
@click.option("--lung-fields", type=click.Choice(["dilated", "segmented"]), default="dilated", show_default=True,
              help="The lung fields --outside and --lung-guidance use: slightly dilated, or as segmented.")
@click.option("--equalize/--no-equalize", default=False, show_default=True,
              help="Histogram-equalize inputs (part of the model's preprocessing contract).")
@click.option("--fine-tune-from", default="block_13_expand", show_default=True,
              help="MobileNetV2: first backbone layer to unfreeze.")
@click.option("--head-epochs", type=int, default=40, show_default=True)
@click.option("--threshold-rule", default="eer", show_default=True, help="eer, youden or recall:R.")
@click.option("--limit-per-class", type=int, default=None, help="Quick runs: at most N images per class.")
@click.option("--split", "split_rule", type=click.Choice(["random", "earliest"]), default="random", show_default=True,
              help="Validation patients: shuffled, or the lowest-numbered of each name series (a temporal hold-out).")
@click.option("--label-smoothing", type=float, default=0.0, show_default=True,
              help="Binary cross-entropy label smoothing (against over-confident scores).")
@click.option("--mixup", type=float, default=0.0, show_default=True,
              help="Mixup: blend each training image (and its label) with another by Beta(A, A) (0: none).")
@click.option("--lungs", "lung_contract", type=click.Choice(["none", "crop", "mask", "crop+mask"]), default="none",
              show_default=True, help="Lung-field contract of the input (needs the lung segmenter, --lung-model).")
@click.option("--lung-model", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Lung segmenter folder [default: models/lungs].")
@click.option("--cnn-head", type=click.Choice(["flatten", "gap"]), default="flatten", show_default=True,
              help="CNN: Flatten (the reference's: a weight per position) or global average pooling before Dense.")
@click.option("--cnn-dense", type=click.Choice(["relu", "batchnorm", "leaky"]), default="relu", show_default=True,
              help="CNN: the head's hidden layer: Dense + ReLU (the reference's), + batch normalization before "
                   "the ReLU, or a leaky ReLU (both against units that never fire).")
@click.option("--imagenet-tflite", "tflite_path", type=click.Path(path_type=Path), default=DEFAULT_TFLITE,
              show_default=True, help="ImageNet MobileNetV2 (int8 TFLite) for the backbone.")
def train(model_name: str, data_dir: Path, out_dir: Path, epochs: int | None, learning_rate: float | None,
          batch_size: int, seed: int, val_fraction: float, patience: int, zoom: float, shear: float,
          flip: bool, rotation: float, translation: float, contrast: float, brightness: float, shift: float,
          corners: float, centre: float, outside: float, aspect: float, lung_guidance: float,
          lung_fields: str, equalize: bool, fine_tune_from: str, head_epochs: int, threshold_rule: str,
          limit_per_class: int | None, split_rule: str, label_smoothing: float, mixup: float, lung_contract: str,
          lung_model: Path | None, cnn_head: str, cnn_dense: str, tflite_path: Path) -> None:
    """Train one model; choose epochs and threshold on a patient-level validation split."""
    if model_name == "lungs":
        from batchcxr.training.lungs import LungTrainConfig, train_lungs

        card = train_lungs(LungTrainConfig(data_dir=data_dir, out_dir=out_dir, seed=seed,
                                           **({"epochs": epochs} if epochs is not None else {})))
        d = card["held_out_dice"]
        click.echo(f"saved {out_dir} in {card['training_seconds']:.0f} s; held-out Dice mean {d['mean']:.4f}, "
                   f"median {d['median']:.4f}, min {d['min']:.4f} ({d['n']} pairs)")
        return
    if outside > 0 and lung_contract == "none":
        raise click.UsageError("--outside needs a lung contract (--lungs): it swaps what lies outside the lung fields")
    if lung_guidance > 0 and lung_contract == "none":
        raise click.UsageError("--lung-guidance needs a lung contract (--lungs): it charges evidence outside the lungs")
    from batchcxr.training.architectures import AugmentConfig
    from batchcxr.training.train import TrainConfig, train as run_train

    data_dir = _train_folder(data_dir)
    default_epochs, default_lr = MODEL_DEFAULTS[model_name]
    cfg = TrainConfig(
        model=model_name,  # type: ignore[arg-type]
        data_dir=data_dir,
        out_dir=out_dir,
        seed=seed,
        val_fraction=val_fraction,
        batch_size=batch_size,
        epochs=default_epochs if epochs is None else epochs,
        learning_rate=default_lr if learning_rate is None else learning_rate,
        patience=patience,
        augment=AugmentConfig(zoom=zoom, shear=shear, horizontal_flip=flip, rotation=rotation,
                              translation=translation, contrast=contrast, brightness=brightness,
                              corners=corners, centre=centre, outside=outside, aspect=aspect, shift=shift),
        head_epochs=head_epochs,
        fine_tune_from=fine_tune_from,
        tflite_path=tflite_path if model_name == "mobilenetv2" else None,
        threshold_rule=threshold_rule,
        limit_per_class=limit_per_class,
        equalize=equalize,
        split=split_rule,  # type: ignore[arg-type]
        label_smoothing=label_smoothing,
        mixup=mixup,
        lungs=lung_contract,
        lung_model=lung_model,
        cnn_head=cnn_head,
        cnn_dense=cnn_dense,
        lung_guidance=lung_guidance,
        lung_fields=lung_fields,
    )
    result = run_train(cfg)
    click.echo(
        f"saved {result.model_dir} after {result.epochs_run} epochs in {result.seconds:.0f} s; "
        f"threshold {result.threshold:.4f}; validation accuracy {result.validation_metrics['accuracy']:.4f}, "
        f"AUC {result.validation_metrics['roc_auc']:.4f}"
    )


@main.command("export-model")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
def export_model(model_dir: Path) -> None:
    """(Re)write a model's ONNX scoring graph from its Keras weights and record it in the card."""
    from batchcxr.infer.models import load_model
    from batchcxr.modelcard import write_card
    from batchcxr.training.train import export_scoring

    model = load_model(model_dir)
    card = dict(model.card)
    card["scoring"] = export_scoring(model.keras_model, card["model"], model_dir)
    write_card(model_dir, card)
    click.echo(f"wrote {model_dir / card['scoring']['file']} ({card['scoring']['sha256'][:12]})")


@main.command()
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="The training data (Kaggle root or its train folder).")
@click.option("--rule", default="eer", show_default=True, help="eer, youden or recall:R.")
def threshold(model_dir: Path, data_dir: Path, rule: str) -> None:
    """Re-choose a model's threshold on its validation split; clears its test metrics."""
    from batchcxr.training.threshold import rethreshold

    data_dir = _train_folder(data_dir)
    card = rethreshold(model_dir, data_dir, rule)
    v = card["validation_metrics"]
    click.echo(f"{card['name']}: threshold {card['threshold']['value']:.4f} ({rule}); "
               f"validation accuracy {v['accuracy']:.4f}, AUC {v['roc_auc']:.4f}")


@main.command()
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Model folder (weights + card.json), e.g. models/mobilenetv2.")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Labelled folder with NORMAL/ and PNEUMONIA/, e.g. .../chest_xray_224/test "
                   "(with --validation: the training data, e.g. .../chest_xray_224).")
@click.option("--validation", is_flag=True, help="Evaluate on the card's own validation split of the train folder "
                                                 "(what choices between models are made on).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where metrics.json, roc.png, confusion_matrix.png and reliability.png go "
                   "[default: out/evaluate/NAME].")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--update-card", is_flag=True, help="Write these metrics into the model card (test metrics, or "
                                                  "validation_evaluation with --validation).")
@click.option("--shift-copies", type=click.IntRange(min=0, max=20), default=0, show_default=True,
              help="Also score this many copies of each image under a simulated acquisition shift (exposure, "
                   "contrast, blur, noise; evaluation/shift.py) and report AUC, accuracy and ECE on them.")
@click.option("--shift-seed", type=int, default=0, show_default=True, help="Seed of the shifted copies.")
@click.option("--against-reviews", is_flag=True,
              help="Instead: each model's study results against the radiologists' latest verdicts in --db.")
@config_option
@db_option
def evaluate(model_dir: Path | None, data_dir: Path | None, validation: bool, out_dir: Path | None, batch_size: int,
             update_card: bool, shift_copies: int, shift_seed: int, against_reviews: bool, config: Path | None,
             db_url: str | None) -> None:
    """Accuracy, per-class precision/recall, ROC AUC, confusion matrix at the card's threshold;
    calibration (ECE, Brier, reliability plot), Grad-CAM mass inside the lung fields and where
    the peaks fall, and the quality gate's refusals. Runs the ONNX scoring graph, as scoring does.

    With --against-reviews: accuracy, sensitivity and specificity of each model against the
    reviewers' verdicts (uncertain verdicts are left out), and AUC, ECE, Brier score and mean
    probability against the observed share of the probabilities readers see (calibrated).
    """
    from batchcxr.evaluation import evaluate as ev

    if against_reviews:
        from batchcxr.evaluation.reviews import against_reviews as compare, format_review_metrics

        if shift_copies:
            raise click.UsageError("--shift-copies perturbs the images of --data, not reviewed studies")

        settings = _settings(config, db_url=db_url)
        store = _open_store(settings)
        click.echo(format_review_metrics(compare(store, settings.quality.lateral_views)))
        store.close()
        return
    if model_dir is None or data_dir is None:
        raise click.UsageError("--model and --data are required (or use --against-reviews)")
    if validation:
        data_dir = _train_folder(data_dir)
    metrics, y, scores = ev.evaluate(model_dir, data_dir, batch_size, validation=validation,
                                     shift_copies=shift_copies, shift_seed=shift_seed)
    out_dir = out_dir or Path("out") / "evaluate" / model_dir.name
    click.echo(ev.format_metrics(metrics))
    json_path = ev.write_results(metrics, out_dir)
    pngs = ev.save_plots(y, scores, float(metrics["threshold"]), model_dir.name, out_dir)
    click.echo(f"wrote {json_path}, " + ", ".join(str(p) for p in pngs))
    if update_card:
        where = "chest_xray_224 --validation" if validation else f"chest_xray_224/{data_dir.name}"
        command = f"batchcxr evaluate --model models/{model_dir.name} --data <shared>/data/{where}"
        if shift_copies:
            command += f" --shift-copies {shift_copies}" + (f" --shift-seed {shift_seed}" if shift_seed else "")
        ev.update_card(model_dir, metrics, command, "validation_evaluation" if validation else "test_metrics")
        click.echo(f"updated {model_dir / 'card.json'} and card.md")


@main.command()
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The training data (Kaggle root or its train folder): the card's validation split is used.")
@click.option("--method", type=click.Choice(["platt", "temperature"]), default="platt", show_default=True)
@click.option("--from-reviews", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Instead: fit Platt scaling on this site's reviewed studies in --db and write the model "
                   "with it to this new folder (name it in the settings' models to use it).")
@click.option("--min-per-class", type=click.IntRange(min=5), default=50, show_default=True,
              help="With --from-reviews: the fewest pneumonia and normal verdicts the fit needs.")
@click.option("--shift-copies", type=click.IntRange(min=0, max=20), default=0, show_default=True,
              help="With --data: fit also on this many copies of each validation film under simulated "
                   "acquisition shift (exposure, contrast, blur, noise), for sites unlike the training hospital.")
@click.option("--shift-seed", type=int, default=0, show_default=True, help="Seed of the shifted copies.")
@config_option
@db_option
def calibrate(model_dir: Path, data_dir: Path | None, method: str, out_dir: Path | None, min_per_class: int,
              shift_copies: int, shift_seed: int, config: Path | None, db_url: str | None) -> None:
    """Fit a probability calibration on the model's validation split and record it in the card
    (the model's version changes with it; labels do not).

    With --from-reviews NEW_FOLDER: fit it on the studies this site's reviewers gave a yes / no
    verdict (each study's highest frontal raw probability), with a 5-fold check of the refit
    against the calibration in use on held-out studies; the shipped folder is left as it is.

    With --shift-copies N: fit it on the validation split and N copies of each of its films as
    other equipment might make them (evaluation/shift.py), less sure of itself on films unlike
    the training hospital's."""
    if out_dir is not None:
        if data_dir is not None:
            raise click.UsageError("--from-reviews fits on the reviewed studies in --db, not on --data: give one")
        if shift_copies:
            raise click.UsageError("--shift-copies perturbs the validation films of --data, not reviewed studies")
        _calibrate_from_reviews(model_dir, out_dir, min_per_class, method, config, db_url)
        return
    if data_dir is None:
        raise click.UsageError("--data is required (or use --from-reviews)")
    from batchcxr.evaluation.calibrate import calibrate_model

    data_dir = _train_folder(data_dir)
    card = calibrate_model(model_dir, data_dir, method, shift_copies, shift_seed)
    c = card["calibration"]
    shift = c.get("shift")
    click.echo(f"{card['name']}: {method} a={c['a']:.4f} b={c['b']:.4f}; validation ECE {c['validation_ece_before']:.4f}"
               f" -> {c['validation_ece_after']:.4f}"
               + (f"; shifted copies ECE {shift['ece_before']:.4f} -> {shift['ece_after']:.4f}" if shift else "")
               + f"; version {card['version']}")


def _calibrate_from_reviews(model_dir: Path, out_dir: Path, min_per_class: int, method: str, config: Path | None,
                            db_url: str | None) -> None:
    from batchcxr.evaluation.site_calibration import recalibrate_from_reviews

    settings = _settings(config, db_url=db_url)
    store = _open_store(settings)
    try:
        card = recalibrate_from_reviews(model_dir, out_dir, store, settings.quality.lateral_views, min_per_class,
                                        method)
    except (ValueError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        store.close()
    c = card["calibration"]
    h = c["site_heldout"]
    click.echo(f"{card['name']}: fitted on {c['fitted_on']}: a={c['a']:.4f} b={c['b']:.4f}\n"
               f"held out ({h['folds']} folds): ECE {h['ece_in_use']:.4f} with the calibration in use -> "
               f"{h['ece_refit']:.4f} refitted; Brier {h['brier_in_use']:.4f} -> {h['brier_refit']:.4f}\n"
               f"wrote {out_dir} (version {card['version']}); to score with it, name it in the settings' models, "
               f"and give the films scored before its calibration with `batchcxr apply-calibration --model {out_dir}` "
               f"(else a run that meets one scores it again)")


@main.command("apply-calibration")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@config_option
@db_option
def apply_calibration(model_dir: Path, config: Path | None, db_url: str | None) -> None:
    """Give the films these weights scored before this folder's calibration, without scoring them again.

    After `calibrate --from-reviews` (or `--shift-copies`) made a new folder of the same weights:
    each image with a prediction of those weights under another calibration gets one of this
    folder's version (the same raw probability and Grad-CAM layer, this card's calibrated
    probability and label), its study's report page is written again, and a run that meets the
    file later finds it scored. Images the folder's version scored already are left alone; stopped
    half-way, run it again."""
    import socket
    import time

    from batchcxr.evaluation.site_calibration import apply_to_archive, classifier_card
    from batchcxr.report.render import ReportWriter

    try:
        card = classifier_card(model_dir)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    settings = _settings(config, db_url=db_url)
    store = _open_store(settings)
    try:
        run_id = store.start_run("apply-calibration", str(model_dir), [card["version"]], host=socket.gethostname(),
                                 pid=os.getpid())
        status, written, start = "interrupted", 0, time.monotonic()
        try:
            written = apply_to_archive(model_dir, store, run_id)
            status = "finished"
        finally:
            store.finish_run(run_id, scored=0, skipped=0, failed=0, unchanged=written,
                             seconds=time.monotonic() - start, status=status)
        index = ReportWriter(settings.reports_dir, settings.quality.lateral_views).write_pending(store, run_id)
    finally:
        store.close()
    click.echo(f"{card['version']}: {written} predictions written without scoring again; report: {index.resolve()}")
    if model_dir.resolve() not in {Path(m).resolve() for m in settings.models}:
        click.echo(f"name {model_dir} in the settings' models, so new films are scored with it too")


EXIT_OK, EXIT_FILES_FAILED, EXIT_USAGE, EXIT_CANNOT_RUN, EXIT_INTERRUPTED = 0, 1, 2, 3, 4
"""`batchcxr score` exit codes: 0 finished (every file scored, skipped, unchanged or deferred);
1 finished, but some files failed (each is recorded with its reason and left in place);
2 bad command line or settings; 3 could not run or could not go on (models, database or a
volume unavailable); 4 stopped by SIGTERM/SIGINT before the end (the run row says interrupted;
run it again to finish)."""


def _train_folder(data_dir: Path) -> Path:
    """A Kaggle-layout root or its train folder -> the train folder."""
    return data_dir / "train" if (data_dir / "train").is_dir() else data_dir


def _settings(config: Path | None, **overrides):
    from batchcxr.errors import ConfigError
    from batchcxr.settings import load_settings

    try:
        return load_settings(config, overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


def _open_store(settings, upgrade: bool = True):
    from batchcxr.store.repo import Store

    return Store.open(settings.sqlalchemy_url, busy_timeout_s=settings.db_busy_timeout_seconds,
                      lateral_views=settings.quality.lateral_views, upgrade=upgrade)


def _mtime(path: Path) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@config_option
@db_option
@click.option("--reports", "reports_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder [default: batchcxr-reports].")
@click.option("--batch-size", type=int, default=None, help="Images per model batch [default: 32].")
@click.option("--rescore", is_flag=True, help="Score again files already scored by these model versions.")
@click.option("--retry-failed", is_flag=True, help="Try again files that failed before (they are not read "
                                                   "again otherwise while they are unchanged).")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: when stderr is a terminal].")
@click.option("--since", default=None, metavar="AGE|DATE",
              help="Only files modified in the last AGE (24h, 90m, 7d) or since DATE (2026-11-24); "
                   "takes the lock file so two such runs never overlap (the nightly job).")
@click.option("--metrics-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write Prometheus metrics here at the end (node_exporter's textfile collector).")
@click.option("--scheduler", default=None, metavar="tcp://HOST:8786|local:N",
              help="Score on Dask workers (a running scheduler, or a LocalCluster of N workers).")
def score(path: Path, config: Path | None, db_url: str | None, reports_dir: Path | None,
          batch_size: int | None, rescore: bool, retry_failed: bool, progress: bool | None,
          since: str | None, metrics_file: Path | None, scheduler: str | None) -> None:
    """Score every DICOM/JPEG/PNG image under PATH with both models; write the database and reports.

    \b
    Exit codes: 0 finished; 1 finished but some files failed (see the report);
    2 bad options or settings; 3 could not run or go on (models, database, disk);
    4 stopped by a signal before the end (run it again to finish).
    """
    from filelock import FileLock, Timeout
    from tqdm import tqdm

    from batchcxr.errors import ModelLoadError
    from batchcxr.ingest.files import walk
    from batchcxr.prepare_stage import early_decoders
    from batchcxr.signals import StopNow

    log = logging.getLogger("batchcxr")
    settings = _settings(config, db_url=db_url, reports_dir=reports_dir, batch_size=batch_size, scheduler=scheduler)
    EARLY.set_timeout(settings.watch.stop_timeout_seconds)
    cutoff = _parse_since(since) if since else None
    lock = FileLock(str(settings.lock_file)) if since else None
    try:
        if lock is not None:
            lock.acquire(timeout=0)
    except Timeout:
        log.error("another run holds %s; not starting", settings.lock_file)
        sys.exit(EXIT_CANNOT_RUN)
    try:
        paths = [p for p in walk(path, settings.ignore) if cutoff is None or _mtime(p) >= cutoff]
        decoders = early_decoders(settings, len(paths))  # ready when the files are admitted
        try:
            # ~1 s with the models and the database: the decode workers start meanwhile
            from batchcxr.pipeline import Scorer

            store = _open_store(settings)
            scorer = Scorer.from_settings(settings, store)
            scorer.adopt_dead_claims()  # a run of ours that died holding files: they are suspects
            started()
        except Exception as exc:  # noqa: BLE001 - reported, with exit code 3
            log.error("cannot start: %s", exc)
            if decoders is not None:
                decoders.shutdown(wait=False, cancel_futures=True)
            sys.exit(EXIT_CANNOT_RUN)
        if retry_failed:
            paths += _failed_paths_under(store, path, set(paths))
        show = sys.stderr.isatty() if progress is None else progress
        try:
            with tqdm(total=len(paths), unit="file", disable=not show, desc="scoring") as bar:
                summary = scorer.score_paths(path, paths, rescore=rescore, retry_failed=retry_failed,
                                             progress=bar.update, command="score --since" if since else "score",
                                             stop=EARLY, keep_files=False, decoders=decoders)
        except StopNow as exc:
            log.error("%s (the run is recorded as interrupted)", exc)
            sys.exit(EXIT_INTERRUPTED)
        except ModelLoadError as exc:  # a session made while the first files were read
            log.error("cannot start: %s (the run is recorded as interrupted)", exc)
            sys.exit(EXIT_CANNOT_RUN)
        except OSError as exc:
            from batchcxr.worker import describe_fault

            log.error("cannot go on: %s (the run is recorded as interrupted)", describe_fault(exc))
            sys.exit(EXIT_CANNOT_RUN)
        except Exception as exc:
            from sqlalchemy.exc import DBAPIError

            if not isinstance(exc, DBAPIError):
                raise
            from batchcxr.worker import describe_fault

            log.error("cannot go on: %s (the run is recorded as interrupted)", describe_fault(exc))
            sys.exit(EXIT_CANNOT_RUN)
        finally:
            EARLY.disarm()
            if settings.scheduler:
                from batchcxr.distributed import close_clients

                close_clients()
        store.close()
    finally:
        if lock is not None:
            lock.release()
    click.echo("\n".join(summary_lines(summary, len(paths))))
    if metrics_file is not None:
        from batchcxr import metrics

        metrics.set_models(scorer.models)
        metrics.write_textfile(metrics_file)
    if summary.status == "interrupted":
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_FILES_FAILED if summary.failed else EXIT_OK)


def _failed_paths_under(store, root: Path, listed: set[Path]) -> list[Path]:
    """Files that failed before under ``root`` and are not listed yet; the ones that are gone
    leave the failure lists."""
    base = os.path.abspath(root)
    found, gone = [], []
    for p in store.failed_paths(base):
        path = Path(p)
        if path in listed:
            continue
        (found if os.path.lexists(path) else gone).append(path)
    store.mark_removed(str(p) for p in gone)
    return found


def summary_lines(summary, n_files: int) -> list[str]:
    """What `batchcxr score` prints: every outcome with its reasons."""
    def block(label: str, counter, note: str = "") -> list[str]:
        total = sum(counter.values())
        out = [f"  {label:<10} {total}{note}"] if total or label in ("skipped", "failed") else []
        return out + [f"    {n:>4}  {reason}" for reason, n in counter.most_common()]

    earlier = {}
    for (status, reason), n in summary.earlier.items():
        earlier.setdefault(status, {})[reason] = n
    from collections import Counter

    lines = [
        f"run #{summary.run_id}: {n_files} files in {summary.seconds:.1f} s"
        + (" (stopped by a signal before the end: run again to finish)" if summary.status == "interrupted" else ""),
        f"  {'scored':<10} {summary.scored} ({summary.images_per_second:.1f} images/s)",
        f"  {'unchanged':<10} {summary.unchanged} (already scored by these model versions)",
    ]
    lines += block("skipped", summary.skipped)
    lines += block("failed", summary.failed)
    lines += block("skipped earlier", Counter(earlier.get("skipped earlier", {})))
    lines += block("failed earlier", Counter(earlier.get("failed earlier", {})), " (batchcxr score --retry-failed "
                                                                                   "tries them again)")
    lines += block("deferred", summary.deferred, " (not handled now: the next run reads them again)")
    if summary.vanished:
        lines.append(f"  {'vanished':<10} {summary.vanished} (gone before they were read: not a failure)")
    if summary.index_path is not None:
        lines.append(f"report: {summary.index_path.resolve()}")
    return lines


def _parse_since(text: str) -> float:
    """A POSIX time from '24h', '90m', '7d' (ago) or an ISO date/time."""
    import datetime as dt
    import re
    import time

    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text.strip())
    if m:
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return time.time() - seconds
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise click.BadParameter(f"{text!r}: use an age like 24h, 90m, 7d or a date like 2026-11-24") from exc
    return when.timestamp()


@main.command()
@config_option
@click.option("--to", "folder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder the instances go to [default: [batchcxr.dicom] incoming_dir].")
@click.option("--port", type=int, default=None, help="Port [default: [batchcxr.dicom] port].")
def listen(config: Path | None, folder: Path | None, port: int | None) -> None:
    """Receive DICOM (C-STORE SCP) from the allowed AE titles into a folder the watcher reads.
    SIGTERM stops it; a transfer in hand finishes first."""
    import time

    from batchcxr import metrics
    from batchcxr.errors import ConfigError
    from batchcxr.ingest.scp import Receiver

    settings = _settings(config, dicom={"port": port} if port else None)
    target = folder or (Path(settings.dicom.incoming_dir) if settings.dicom.incoming_dir else None)
    if target is None:
        raise click.UsageError("no folder: give --to DIR or set [batchcxr.dicom] incoming_dir")
    try:
        receiver = Receiver(settings.dicom, target)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if settings.dicom.metrics_port:
        metrics.serve(settings.dicom.metrics_port)
    receiver.start()
    try:
        while not EARLY.requested:
            time.sleep(0.2)
    finally:
        receiver.stop()
    click.echo(f"received {receiver.received} instances", err=True)


@main.command()
@config_option
@db_option
@click.option("--since", default="24h", show_default=True, metavar="AGE|DATE", help="Studies from this date on.")
@click.option("--receive-to", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Receive the moved studies here with an SCP of our own for the pull (no `listen` running); "
                   "DICOMweb writes here.")
def pull(config: Path | None, db_url: str | None, since: str, receive_to: Path | None) -> None:
    """Ask the PACS for CR/DX studies since AGE and fetch them (C-FIND + C-MOVE to our AE title,
    or QIDO-RS + WADO-RS with pull_via = "dicomweb"). Exit 1 if some studies could not be fetched."""
    import datetime as dt

    from batchcxr.ingest.pull import pull as run_pull
    from batchcxr.ingest.scp import Receiver

    settings = _settings(config, db_url=db_url)
    cfg = settings.dicom
    if cfg.pull_via == "dicomweb" and not (receive_to or cfg.incoming_dir):
        raise click.UsageError("DICOMweb pulls need --receive-to DIR (or incoming_dir)")
    if cfg.pull_via != "dicomweb" and not cfg.pacs_ae:
        raise click.UsageError("set [batchcxr.dicom] pacs_ae, pacs_host and pacs_port")
    day = dt.datetime.fromtimestamp(_parse_since(since)).date()
    store = _open_store(settings)
    receiver = None
    if receive_to is not None and cfg.pull_via != "dicomweb":
        receiver = Receiver(cfg, receive_to)
        receiver.start()
    try:
        summary = run_pull(cfg, store, day, receive_to or (Path(cfg.incoming_dir) if cfg.incoming_dir else None))
    finally:
        if receiver is not None:
            receiver.stop()
        store.close()
    click.echo(f"{summary.found} studies found since {day}, {summary.skipped} already here, {summary.fetched} fetched "
               f"({summary.instances} instances), {len(summary.failed)} failed")
    for uid, error in summary.failed.items():
        click.echo(f"  {uid}: {error}")
    sys.exit(1 if summary.failed else 0)


@main.command()
@config_option
@db_option
@click.option("--daemon", is_flag=True, help="Keep sending what becomes due until stopped.")
def send(config: Path | None, db_url: str | None, daemon: bool) -> None:
    """Send the results in the outbox to the configured destinations (C-STORE or STOW-RS).
    Exit 1 if some are still waiting (their destination is down: they are retried)."""
    from batchcxr.report.send import Outbox, send_loop

    settings = _settings(config, db_url=db_url)
    store = _open_store(settings)
    outbox = Outbox(settings, store)
    if daemon:
        send_loop(outbox, EARLY)
    total = outbox.send_due(limit=1000)
    summary = store.outbox_summary()
    store.close()
    pending = sum(d.get("pending", 0) for d in summary.values())
    click.echo(f"sent {total.sent}, failed {total.failed}; waiting {pending}")
    for name, d in summary.items():
        if d.get("last_error"):
            click.echo(f"  {name}: {d['last_error']}")
    sys.exit(1 if pending else 0)


@main.command()
@config_option
@db_option
@click.option("--reports", "reports_dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--rebuild", is_flag=True, help="Write every study page again (after an upgrade), in chunks of 200.")
def report(config: Path | None, db_url: str | None, reports_dir: Path | None, rebuild: bool) -> None:
    """Bring the static report folder up to date (runs do this themselves; --rebuild renders all)."""
    from batchcxr.report.render import ReportWriter

    settings = _settings(config, db_url=db_url, reports_dir=reports_dir)
    store = _open_store(settings)
    if rebuild:
        click.echo(f"{store.mark_all_stale()} study pages to write", err=True)
    index = ReportWriter(settings.reports_dir, settings.quality.lateral_views).write_pending(store)
    store.close()
    click.echo(f"report: {index.resolve()}")


@main.command()
@click.argument("drop_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@config_option
@db_option
@click.option("--reports", "reports_dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--archive", "archive_dir", default=None, help="Move handled inputs here [default: leave in place].")
@click.option("--quarantine", "quarantine_dir", default=None, help="Failed inputs go here [default: quarantine].")
@click.option("--polling/--inotify", default=None, help="Poll the folder (network shares) instead of inotify.")
@click.option("--max-idle", type=float, default=None, help="Exit after this many idle seconds (tests, one-shot use).")
@click.option("--log-json", is_flag=True, help="Structured JSON logs on stderr (journald, log shippers).")
@click.option("--scheduler", default=None, metavar="tcp://HOST:8786|local:N", help="Score batches on Dask workers.")
def watch(drop_dir: Path, config: Path | None, db_url: str | None, reports_dir: Path | None,
          archive_dir: str | None, quarantine_dir: str | None, polling: bool | None,
          max_idle: float | None, log_json: bool, scheduler: str | None) -> None:
    """Watch DROP_DIR: score each study once it is complete; archive or quarantine its files.

    Faults (disk full, database locked or unreachable, folders not writable) are logged, shown
    by `batchcxr status` and retried until they clear; SIGTERM finishes the batch in hand and
    exits 0."""
    from batchcxr.pipeline import Scorer
    from batchcxr.worker import Watcher

    if log_json:
        _json_logging()
    watch_overrides = {k: v for k, v in (("archive_dir", archive_dir), ("quarantine_dir", quarantine_dir),
                                         ("polling", polling)) if v is not None}
    settings = _settings(config, db_url=db_url, reports_dir=reports_dir,
                         watch=watch_overrides or None, scheduler=scheduler)
    try:
        store = _open_store(settings, upgrade=False)  # the watcher migrates, retrying while the database is down
        scorer = Scorer.from_settings(settings, store)
        scorer.wait_for_models()  # a daemon that cannot score says so at start, not at its first file
    except Exception as exc:  # noqa: BLE001
        logging.getLogger("batchcxr").error("cannot start: %s", exc)
        sys.exit(EXIT_CANNOT_RUN)
    started()
    watcher = Watcher(scorer, drop_dir, stop=EARLY)
    code = watcher.run(max_idle_seconds=max_idle)
    store.close()
    sys.exit(code)


def started() -> None:
    """Start-up is done: the objects of the imports, settings and models (~100k) live as long as
    the process, so the garbage collector stops scanning them (gc.freeze; they are still freed by
    reference counting). Per 2,000-image run its full collections take 0.07 s instead of 0.15 and
    the interpreter's exit 0.05 s instead of 0.19 (docs/performance-log.md, "start-up's objects frozen")."""
    import gc

    gc.freeze()


def _json_logging() -> None:
    from pythonjsonlogger.json import JsonFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                       rename_fields={"levelname": "level", "asctime": "time"}))
    root = logging.getLogger()
    root.handlers[:] = [handler]


@main.command()
@config_option
@db_option
@click.option("--stale-after", type=float, default=60.0, show_default=True,
              help="A heartbeat older than this many seconds means the daemon is not alive.")
@click.option("--backlog-after", type=float, default=900.0, show_default=True,
              help="A file waiting longer than this many seconds means the daemon is degraded.")
@click.option("--failed", "failed_page", type=int, default=None, metavar="PAGE",
              help="List the files not scored (50 a page), newest first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts and monitoring.")
def status(config: Path | None, db_url: str | None, stale_after: float, backlog_after: float,
           failed_page: int | None, as_json: bool) -> None:
    """Daemon heartbeat, faults, files waiting, last scored, errors in the last 24 h, files not scored.

    \b
    Exit codes: 0 a daemon is up and healthy; 1 no daemon ever ran on this database, or none
    is up; 2 up but degraded (a fault, a backlog, a daemon down among several).
    """
    import json

    from batchcxr.status import gather, render

    settings = _settings(config, db_url=db_url)
    report = gather(settings, stale_after=stale_after, backlog_after=backlog_after,
                    failed_page=failed_page)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render(report))
    sys.exit(report["exit_code"])


@main.command()
@config_option
@db_option
@click.option("--host", default=None, help="Address to bind [default: 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [default: 8080].")
def serve(config: Path | None, db_url: str | None, host: str | None, port: int | None) -> None:
    """The review app: worklist, study viewer with Grad-CAM overlays, verdicts (login required).

    Refuses to start with unsafe settings (a short or example secret key, weak password hashes,
    a non-loopback address without TLS or behind_tls_proxy)."""
    from batchcxr.errors import ConfigError
    from batchcxr.web.app import serve as run_server
    from batchcxr.web.security import check_web_settings

    web = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    settings = _settings(config, db_url=db_url, web=web or None)
    if not settings.web.users:
        raise click.UsageError("no reviewers configured: add [batchcxr.web.users] name = \"<hash>\" "
                               "to the config (batchcxr hash-password makes the hash)")
    try:
        check_web_settings(settings.web)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    store = _open_store(settings)
    scheme = "https" if settings.web.tls_cert else "http"
    click.echo(f"serving {scheme}://{settings.web.host}:{settings.web.port}/ (Ctrl-C to stop)", err=True)
    run_server(settings, store)


@main.command("hash-password")
def hash_password() -> None:
    """Print a password hash (scrypt) for [batchcxr.web.users] in the config. The password is read
    from the terminal (asked twice), or from the first line of standard input - never from the
    command line, where other users and the shell history would see it."""
    import getpass

    from werkzeug.security import generate_password_hash

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat: ") != password:
            raise click.UsageError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 12:
        raise click.UsageError("use at least 12 characters")
    click.echo(generate_password_hash(password, method="scrypt:32768:8:1"))


@main.group()
def sessions() -> None:
    """Review-app sessions (kept in the database)."""


@sessions.command("list")
@config_option
@db_option
def sessions_list(config: Path | None, db_url: str | None) -> None:
    """The live sessions: user, address, since, last seen."""
    store = _open_store(_settings(config, db_url=db_url))
    for si in store.live_web_sessions():
        click.echo(f"{si.user}\t{si.address}\tsince {si.created_at:%Y-%m-%d %H:%M}\tlast seen {si.last_seen_at:%H:%M:%S}")
    store.close()


@sessions.command("revoke")
@click.argument("user")
@config_option
@db_option
def sessions_revoke(user: str, config: Path | None, db_url: str | None) -> None:
    """End every session of USER at once."""
    import getpass

    store = _open_store(_settings(config, db_url=db_url))
    n = store.revoke_web_sessions(user)
    store.audit("sessions_revoke", user=f"cli:{getpass.getuser()}", target=user, detail=f"{n} sessions")
    store.close()
    click.echo(f"{n} sessions of {user} ended")


@main.command()
@config_option
@db_option
@click.option("--since", default="7d", show_default=True, metavar="AGE|DATE", help="24h, 7d, or a date.")
@click.option("--user", default=None, help="Only this user's events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit(config: Path | None, db_url: str | None, since: str, user: str | None, as_json: bool) -> None:
    """The audit log: who (user, address), when, what (logins, pages, images, verdicts, exports)."""
    import datetime as dt
    import json

    store = _open_store(_settings(config, db_url=db_url))
    cutoff = dt.datetime.fromtimestamp(_parse_since(since), dt.timezone.utc).replace(tzinfo=None)
    for e in store.audit_events(cutoff, user):
        if as_json:
            click.echo(json.dumps({"at": e.at.isoformat(), "user": e.user, "address": e.address, "action": e.action,
                                   "target": e.target, "detail": e.detail}))
        else:
            click.echo(f"{e.at:%Y-%m-%d %H:%M:%S} {e.user or '-':<12} {e.address or '-':<15} {e.action:<16} "
                       f"{e.target} {e.detail}".rstrip())
    store.close()


@main.command()
@config_option
@db_option
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file [default: standard output].")
def export(config: Path | None, db_url: str | None, fmt: str, out_file: Path | None) -> None:
    """Export every prediction (one row per image and model) as CSV or JSON.

    CSV cells that a spreadsheet would read as formulas are neutralised (a leading apostrophe,
    every cell quoted)."""
    from batchcxr.export import write_csv, write_json
    from batchcxr.store.repo import PREDICTION_FIELDS

    import getpass

    settings = _settings(config, db_url=db_url)
    store = _open_store(settings)
    store.audit("cli_export", user=f"cli:{getpass.getuser()}", target=str(out_file or "stdout"), detail=fmt)
    rows = store.iter_prediction_rows()
    out = sys.stdout if out_file is None else open(out_file, "w", newline="", encoding="utf-8")
    try:
        n = write_csv(rows, PREDICTION_FIELDS, out) if fmt == "csv" else write_json(rows, out)
    finally:
        if out_file is not None:
            out.close()
        store.close()
    if out_file is not None:
        click.echo(f"wrote {n} rows to {out_file}", err=True)


if __name__ == "__main__":
    main()
