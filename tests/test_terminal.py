"""What a user sees first: the same run from both runners, the terminal output, the table.

- Both runners train the quickstart on a tiny budget; their runs, read back with
  TensorBoard's EventAccumulator and projector proto, hold the same scalar and
  histogram tags at the same steps, the same graph scopes and the same projector entries.
- ``tbx-lightning fit ... > file`` in a real process: a few lines per epoch instead of
  a redrawn bar, no notes caused by the templates, and a summary naming real tags.
- ``tbx-lightning hparams``: at most 120 characters a line by default, and quiet on a
  closed pipe.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format
from tensorboard.backend.event_processing.event_accumulator import (
    HISTOGRAMS,
    SCALARS,
    TENSORS,
    EventAccumulator,
)
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

from tbx_lightning import cli
from tbx_lightning.cli import _table

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*log_every_n_steps.*",
    "ignore:.*isinstance.treespec, LeafSpec.*",
)

TINY = [
    "trainer.max_epochs=2",
    "data.limit=96",
    "data.batch_size=32",
    "trainer.log_every_n_steps=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.training_monitor.hist_every_n_steps=2",
    "callbacks.training_monitor.norm_every_n_steps=1",
    "callbacks.embedding_projector.every_n_epochs=1",
]
EXPERIMENTS = {"lightning": "quickstart", "accelerate": "quickstart_accelerate"}


def _accumulator(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, TENSORS: 0, HISTOGRAMS: 0})
    acc.Reload()
    return acc


def _projector(log_dir: Path) -> list[tuple[str, tuple[int, ...], tuple[int, ...], bool]]:
    text = (log_dir / "projector_config.pbtxt").read_text(encoding="utf-8")
    config = text_format.Parse(text, ProjectorConfig())
    return sorted(
        (
            e.tensor_name.removesuffix(" (latest)"),
            tuple(e.tensor_shape),
            tuple(e.sprite.single_image_dim),
            bool(e.metadata_path),
        )
        for e in config.embeddings
    )


def _what_a_dashboard_sees(log_dir: Path) -> dict[str, Any]:
    acc = _accumulator(log_dir)
    scalars = set(acc.Tags()["scalars"])
    return {
        "scalars": scalars,
        "histograms": set(acc.Tags()["histograms"]),
        "steps": {
            tag: [e.step for e in acc.Scalars(tag)]
            for tag in scalars
            if tag.startswith(("train/", "val/")) or "backbone.0" in tag
        },
        "graph": {node.name.split("/")[0] + "/" + node.name for node in acc.Graph().node},
        "projector": _projector(log_dir),
    }


@pytest.fixture(scope="module")
def both_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runs = tmp_path_factory.mktemp("runs")
    out = {}
    for runner, experiment in EXPERIMENTS.items():
        assert cli.main(["fit", experiment, f"paths.runs_dir={runs}", *TINY]) == 0
        (out[runner],) = sorted((runs / experiment).glob("version_*"))
    return out


def test_both_runners_write_the_same_run(both_runs: dict[str, Path]) -> None:
    lightning = _what_a_dashboard_sees(both_runs["lightning"])
    accelerate = _what_a_dashboard_sees(both_runs["accelerate"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= lightning["scalars"]
    assert "vitals_layers/grad_norm/net.backbone.0" in lightning["scalars"]
    for key in ("scalars", "histograms", "steps", "graph", "projector"):
        assert lightning[key] == accelerate[key], key
    # Two projector steps (after each epoch), 32x32 digit sprites, labels.
    steps = [name.rsplit(":", 1)[1] for name, *_ in lightning["projector"]]
    assert len(steps) == 2
    assert all(sprite == (32, 32) and labels for _, _, sprite, labels in lightning["projector"])


# ------------------------------------------------------------------------ terminal
_NO_RICH = (
    # What a user without `rich` gets (the templates extra does not bring it):
    # Lightning's TQDM bar instead of its Rich bar.
    "import lightning.pytorch.trainer.connectors.callback_connector as c\n"
    "c._RICH_AVAILABLE = False\n"
    "import sys\n"
    "from tbx_lightning.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
EPOCHS = 3
_NOISE = ("was configured so", "💡 Tip", "GPU available: False", "TPU available: False")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("runner", ["lightning", "accelerate"])
def test_redirected_output_has_a_line_per_epoch(tmp_path: Path, runner: str) -> None:
    out_file = tmp_path / "out.txt"
    args = [
        "fit",
        EXPERIMENTS[runner],
        f"paths.runs_dir={tmp_path / 'runs'}",
        f"trainer.max_epochs={EPOCHS}",
        "data.limit=512",
    ]
    with out_file.open("wb") as out:  # `tbx-lightning fit ... > out.txt`
        done = subprocess.run(
            [sys.executable, "-c", _NO_RICH, *args],
            stdout=out,
            stderr=subprocess.PIPE,
            timeout=110,
            env={**os.environ, "COLUMNS": "120"},
        )
    text = out_file.read_text(encoding="utf-8")
    err = done.stderr.decode()
    assert done.returncode == 0, err
    # A redrawn bar wrote 11 KB here (8 batches, 3 epochs); lines write a few hundred bytes.
    assert out_file.stat().st_size < 1500, text
    lines = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == [f"{n}/{EPOCHS}" for n in range(1, EPOCHS + 1)]
    assert re.fullmatch(r"epoch 3/3  step 24  val/acc=\S+  val/loss=\S+  .* \d+\.\d s", lines[-1])
    assert not [n for n in _NOISE if n in text + err], text + err
    # The summary names tags that the run has.
    (shown,) = re.findall(r"metrics: +(.*)", text)
    names = {pair.split("=")[0] for pair in shown.split()}
    (run,) = (tmp_path / "runs" / EXPERIMENTS[runner]).glob("version_*")
    assert names == {"val/acc", "val/loss", "train/acc", "train/loss"}
    assert names <= set(_accumulator(run).Tags()["scalars"])


# ------------------------------------------------------------------------ hparams
def _runs(root: Path) -> Path:
    """Six runs of a sweep over three keys, with long values, written by the logger."""
    from tbx_lightning import TBXLogger

    for index in range(6):
        logger = TBXLogger(str(root), name="wide", version=index)
        logger.log_hyperparams(
            {
                "model": {"optimizer": {"lr": 10.0**-index, "weight_decay": 0.0}},
                "data": {"batch_size": 32 * (index % 2 + 1), "path": f"/data/{'x' * 40}/{index}"},
                "trainer": {"max_epochs": 10, "precision": "32-true"},
            }
        )
        for step in range(4):
            logger.log_metrics(
                {
                    "train/loss": 1.0 / (step + 1),
                    "train/acc": 0.25 * step,
                    "train/loss_epoch": 1.1 / (step + 1),
                    "val/loss": 1.2 / (step + 1),
                    "val/acc": 0.2 * step,
                    "val/perplexity": 3.0 / (step + 1),
                    "vitals_layers/grad_norm/net.backbone.0": 0.5,
                },
                step=step,
            )
        logger.finalize("success")
        logger.close()
    return root / "wide"


def test_hparams_fits_120_columns_with_the_main_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = _runs(tmp_path)
    assert cli.main(["hparams", str(directory)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 120, "\n".join(lines)
    header = lines[0].split()
    # Swept keys (shortened, long values clipped), val/* and the training loss, status, time.
    assert header[0] == "run" and header[-2:] == ["status", "seconds"]
    assert {"lr", "batch_size", "val/acc", "val/loss", "train/loss_epoch"} <= set(header)
    assert not {"train/acc", "max_epochs"} & set(header)
    # The val/* best values are default columns too, the first to go when space is short.
    columns, _ = _table.table_rows(_table.read_runs(directory))
    assert {"val/acc best", "val/loss best"} <= set(columns)
    assert "train/loss_epoch best" not in columns and "val/acc best" not in lines[0]
    assert len(lines) == 2 + 6 + 1 and lines[-1].startswith("(3 more columns left out")
    # Everything is still there behind flags.
    assert cli.main(["hparams", str(directory), "--all", "--format", "csv"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split(",")
    assert {"model.optimizer.lr", "trainer.max_epochs", "train/acc", "train/acc best"} <= set(
        header
    )
    assert not any(h.startswith("vitals/") for h in header)
    assert cli.main(["hparams", str(directory), "--keys", "trainer.*", "--metrics", "val/acc"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == [
        "run",
        "trainer.max_epochs",
        "trainer.precision",
        "val/acc",
        "status",
        "seconds",
    ]
    columns, rows = _table.table_rows(_table.read_runs(directory), best=True)
    assert "val/acc best" in columns and rows[0]["val/acc best"] == pytest.approx(0.6)


def _command() -> list[str]:
    script = Path(sys.executable).with_name("tbx-lightning")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tbx_lightning.cli._main"]


@pytest.mark.timeout(60)
def test_hparams_on_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    directory = _runs(tmp_path)
    # The reader is gone before the table is written: the write meets a closed pipe.
    proc = subprocess.Popen(
        [*_command(), "hparams", str(directory)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=50)
    assert proc.returncode == 0 and err == b"", err.decode()
    # And as a user types it.
    shell = f"{' '.join(_command())} hparams {directory} | head -1"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", shell], capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.split()[:2] == ["run", "lr"] or done.stdout.startswith("run ")
