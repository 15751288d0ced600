"""The `batchcxr` command line. Thin: parse options, build config, call one function."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from batchcxr.paths import PROJECT_ROOT

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
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Bulk pneumonia scoring of chest X-rays. Not for diagnostic use."""
    _setup_logging(verbose)


@main.command()
@click.option("--model", "model_name", type=click.Choice(["cnn", "mobilenetv2"]), required=True)
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
@click.option("--corners", type=float, default=0.0, show_default=True,
              help="Probability of blanking each corner square (burned-in markers).")
@click.option("--aspect", type=float, default=0.0, show_default=True,
              help="Random horizontal-only zoom: aspect-ratio jitter against the squash shortcut.")
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
@click.option("--imagenet-tflite", "tflite_path", type=click.Path(path_type=Path), default=DEFAULT_TFLITE,
              show_default=True, help="ImageNet MobileNetV2 (int8 TFLite) for the backbone.")
def train(model_name: str, data_dir: Path, out_dir: Path, epochs: int | None, learning_rate: float | None,
          batch_size: int, seed: int, val_fraction: float, patience: int, zoom: float, shear: float,
          flip: bool, rotation: float, translation: float, contrast: float, brightness: float,
          corners: float, aspect: float, equalize: bool, fine_tune_from: str, head_epochs: int, threshold_rule: str,
          limit_per_class: int | None, split_rule: str, label_smoothing: float, tflite_path: Path) -> None:
    """Train one model; choose epochs and threshold on a patient-level validation split."""
    from batchcxr.training.architectures import AugmentConfig
    from batchcxr.training.train import TrainConfig, train as run_train

    if (data_dir / "train").is_dir():
        data_dir = data_dir / "train"
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
                              corners=corners, aspect=aspect),
        head_epochs=head_epochs,
        fine_tune_from=fine_tune_from,
        tflite_path=tflite_path if model_name == "mobilenetv2" else None,
        threshold_rule=threshold_rule,
        limit_per_class=limit_per_class,
        equalize=equalize,
        split=split_rule,  # type: ignore[arg-type]
        label_smoothing=label_smoothing,
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

    if (data_dir / "train").is_dir():
        data_dir = data_dir / "train"
    card = rethreshold(model_dir, data_dir, rule)
    v = card["validation_metrics"]
    click.echo(f"{card['name']}: threshold {card['threshold']['value']:.4f} ({rule}); "
               f"validation accuracy {v['accuracy']:.4f}, AUC {v['roc_auc']:.4f}")


@main.command()
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Model folder (weights + card.json), e.g. models/mobilenetv2.")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Labelled folder with NORMAL/ and PNEUMONIA/, e.g. .../chest_xray_224/test.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where metrics.json, roc.png and confusion_matrix.png go [default: out/evaluate/NAME].")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--update-card", is_flag=True, help="Write these metrics into the model card as its test metrics.")
@click.option("--against-reviews", is_flag=True,
              help="Instead: each model's study results against the radiologists' latest verdicts in --db.")
@config_option
@db_option
def evaluate(model_dir: Path | None, data_dir: Path | None, out_dir: Path | None, batch_size: int,
             update_card: bool, against_reviews: bool, config: Path | None, db_url: str | None) -> None:
    """Accuracy, per-class precision/recall, ROC AUC and confusion matrix at the card's threshold.

    With --against-reviews: accuracy, sensitivity and specificity of each model against the
    reviewers' verdicts (uncertain verdicts are left out).
    """
    from batchcxr.evaluation import evaluate as ev
    from batchcxr.infer.models import load_model

    if against_reviews:
        from batchcxr.evaluation.reviews import against_reviews as compare, format_review_metrics
        from batchcxr.store.repo import Store

        settings = _settings(config, db_url=db_url)
        store = Store.open(settings.sqlalchemy_url)
        click.echo(format_review_metrics(compare(store, settings.quality.lateral_views)))
        store.close()
        return
    if model_dir is None or data_dir is None:
        raise click.UsageError("--model and --data are required (or use --against-reviews)")

    model = load_model(model_dir)
    metrics, y, scores = ev.evaluate(model, data_dir, batch_size)
    out_dir = out_dir or Path("out") / "evaluate" / model.name
    click.echo(ev.format_metrics(metrics))
    json_path = ev.write_results(metrics, out_dir)
    pngs = ev.save_plots(y, scores, model.threshold, model.name, out_dir)
    click.echo(f"wrote {json_path}, " + ", ".join(str(p) for p in pngs))
    if update_card:
        command = f"batchcxr evaluate --model models/{model.name} --data <shared>/data/chest_xray_224/{data_dir.name}"
        ev.update_card(model, metrics, command)
        click.echo(f"updated {model_dir / 'card.json'} and card.md")


EXIT_OK, EXIT_FILES_FAILED, EXIT_USAGE, EXIT_CANNOT_RUN = 0, 1, 2, 3
"""`batchcxr score` exit codes: 0 finished (every file scored, skipped or unchanged);
1 finished, but some files failed (each is recorded with its reason and left in place);
2 bad command line or settings; 3 could not run (models or database unavailable)."""


def _settings(config: Path | None, **overrides):
    from batchcxr.errors import ConfigError
    from batchcxr.settings import load_settings

    try:
        return load_settings(config, overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@config_option
@db_option
@click.option("--reports", "reports_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder [default: batchcxr-reports].")
@click.option("--batch-size", type=int, default=None, help="Images per model batch [default: 32].")
@click.option("--rescore", is_flag=True, help="Score again files already scored by these model versions.")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: when stderr is a terminal].")
@click.option("--since", default=None, metavar="AGE|DATE",
              help="Only files modified in the last AGE (24h, 90m, 7d) or since DATE (2026-11-24); "
                   "takes the lock file so two such runs never overlap (the nightly job).")
def score(path: Path, config: Path | None, db_url: str | None, reports_dir: Path | None,
          batch_size: int | None, rescore: bool, progress: bool | None, since: str | None) -> None:
    """Score every DICOM/JPEG/PNG image under PATH with both models; write the database and reports.

    \b
    Exit codes: 0 finished; 1 finished but some files failed (see the report);
    2 bad options or settings; 3 could not run (models or database).
    """
    from tqdm import tqdm

    from batchcxr.ingest.files import walk
    from batchcxr.pipeline import Scorer
    from batchcxr.store.repo import Store

    from filelock import FileLock, Timeout

    settings = _settings(config, db_url=db_url, reports_dir=reports_dir, batch_size=batch_size)
    cutoff = _parse_since(since) if since else None
    lock = FileLock(str(settings.lock_file)) if since else None
    try:
        if lock is not None:
            lock.acquire(timeout=0)
    except Timeout:
        logging.getLogger("batchcxr").error("another run holds %s; not starting", settings.lock_file)
        sys.exit(EXIT_CANNOT_RUN)
    try:
        try:
            store = Store.open(settings.sqlalchemy_url)
            scorer = Scorer.from_settings(settings, store)
        except Exception as exc:  # noqa: BLE001 - reported, with exit code 3
            logging.getLogger("batchcxr").error("cannot start: %s", exc)
            sys.exit(EXIT_CANNOT_RUN)
        paths = [p for p in walk(path) if cutoff is None or p.stat().st_mtime >= cutoff]
        show = sys.stderr.isatty() if progress is None else progress
        with tqdm(total=len(paths), unit="file", disable=not show, desc="scoring") as bar:
            summary = scorer.score_paths(path, paths, rescore=rescore, progress=bar.update,
                                         command="score --since" if since else "score")
        store.close()
    finally:
        if lock is not None:
            lock.release()
    lines = [
        f"run #{summary.run_id}: {len(paths)} files in {summary.seconds:.1f} s",
        f"  scored     {summary.scored} ({summary.images_per_second:.1f} images/s)",
        f"  unchanged  {summary.unchanged} (already scored by these model versions)",
        f"  skipped    {sum(summary.skipped.values())}",
    ]
    lines += [f"    {n:>4}  {reason}" for reason, n in summary.skipped.most_common()]
    lines.append(f"  failed     {sum(summary.failed.values())}")
    lines += [f"    {n:>4}  {reason}" for reason, n in summary.failed.most_common()]
    lines.append(f"report: {summary.index_path.resolve()}")
    click.echo("\n".join(lines))
    sys.exit(EXIT_FILES_FAILED if summary.failed else EXIT_OK)


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
@click.argument("drop_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@config_option
@db_option
@click.option("--reports", "reports_dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--archive", "archive_dir", default=None, help="Move handled inputs here [default: leave in place].")
@click.option("--quarantine", "quarantine_dir", default=None, help="Failed inputs go here [default: quarantine].")
@click.option("--polling/--inotify", default=None, help="Poll the folder (network shares) instead of inotify.")
@click.option("--max-idle", type=float, default=None, help="Exit after this many idle seconds (tests, one-shot use).")
@click.option("--log-json", is_flag=True, help="Structured JSON logs on stderr (journald, log shippers).")
def watch(drop_dir: Path, config: Path | None, db_url: str | None, reports_dir: Path | None,
          archive_dir: str | None, quarantine_dir: str | None, polling: bool | None,
          max_idle: float | None, log_json: bool) -> None:
    """Watch DROP_DIR: score each study once it is complete; archive or quarantine its files."""
    from batchcxr.pipeline import Scorer
    from batchcxr.store.repo import Store
    from batchcxr.worker import Watcher

    if log_json:
        _json_logging()
    watch_overrides = {k: v for k, v in (("archive_dir", archive_dir), ("quarantine_dir", quarantine_dir),
                                         ("polling", polling)) if v is not None}
    settings = _settings(config, db_url=db_url, reports_dir=reports_dir,
                         watch=watch_overrides or None)
    try:
        store = Store.open(settings.sqlalchemy_url)
        scorer = Scorer.from_settings(settings, store)
    except Exception as exc:  # noqa: BLE001
        logging.getLogger("batchcxr").error("cannot start: %s", exc)
        sys.exit(EXIT_CANNOT_RUN)
    watcher = Watcher(scorer, drop_dir)
    watcher.install_signal_handlers()
    code = watcher.run(max_idle_seconds=max_idle)
    store.close()
    sys.exit(code)


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
def status(config: Path | None, db_url: str | None, stale_after: float) -> None:
    """Daemon heartbeat, files waiting, studies pending, last scored, errors in the last 24 h."""
    import datetime as dt

    from batchcxr.store.repo import Store
    from batchcxr.store.schema import utcnow

    settings = _settings(config, db_url=db_url)
    store = Store.open(settings.sqlalchemy_url)
    now = utcnow()
    daemons = store.daemons()
    if not daemons:
        click.echo("watcher: never ran on this database")
    for d in daemons:
        age = (now - d.heartbeat_at).total_seconds()
        alive = d.state == "running" and age <= stale_after
        click.echo(f"{d.name}: {'ALIVE' if alive else 'NOT RUNNING'} (state {d.state}, pid {d.pid} on {d.host}, "
                   f"heartbeat {age:.0f} s ago)")
        click.echo(f"  files waiting {d.files_waiting}, studies pending {d.studies_pending}, "
                   f"last scored {d.last_scored_at or 'never'}")
    click.echo(f"last prediction: {store.last_prediction_at() or 'never'}")
    errors = store.errors_since(now - dt.timedelta(hours=24))
    failed = [e for e in errors if e.status == "failed"]
    click.echo(f"last 24 h: {len(failed)} failed, {len(errors) - len(failed)} skipped")
    for e in failed[-10:]:
        click.echo(f"  {e.created_at:%Y-%m-%d %H:%M} {e.path}: {e.reason}")
    store.close()
    if daemons and not any(d.state == "running" and (now - d.heartbeat_at).total_seconds() <= stale_after
                           for d in daemons):
        sys.exit(1)


@main.command()
@config_option
@db_option
@click.option("--host", default=None, help="Address to bind [default: 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [default: 8080].")
def serve(config: Path | None, db_url: str | None, host: str | None, port: int | None) -> None:
    """The review app: worklist, study viewer with Grad-CAM overlays, verdicts (login required)."""
    from batchcxr.store.repo import Store
    from batchcxr.web.app import serve as run_server

    web = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    settings = _settings(config, db_url=db_url, web=web or None)
    if not settings.web.users:
        raise click.UsageError("no reviewers configured: add [batchcxr.web.users] name = \"<hash>\" "
                               "to the config (batchcxr hash-password makes the hash)")
    store = Store.open(settings.sqlalchemy_url)
    click.echo(f"serving http://{settings.web.host}:{settings.web.port}/ (Ctrl-C to stop)", err=True)
    run_server(settings, store)


@main.command("hash-password")
@click.password_option(help="The password (asked for when omitted).")
def hash_password(password: str) -> None:
    """Print a password hash for [batchcxr.web.users] in the config."""
    from werkzeug.security import generate_password_hash

    click.echo(generate_password_hash(password))


@main.command()
@config_option
@db_option
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file [default: standard output].")
def export(config: Path | None, db_url: str | None, fmt: str, out_file: Path | None) -> None:
    """Export every prediction (one row per image and model) as CSV or JSON."""
    import pandas as pd

    from batchcxr.store.repo import Store

    settings = _settings(config, db_url=db_url)
    store = Store.open(settings.sqlalchemy_url)
    frame = pd.DataFrame(store.prediction_rows())
    store.close()
    text = frame.to_csv(index=False) if fmt == "csv" else frame.to_json(orient="records", indent=2)
    if out_file is None:
        click.echo(text, nl=False)
    else:
        out_file.write_text(text)
        click.echo(f"wrote {len(frame)} rows to {out_file}", err=True)


if __name__ == "__main__":
    main()
