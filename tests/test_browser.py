"""A real browser on a real TensorBoard: HParams, projector, alerts and bands as a user sees them.

Screenshots go to tmp_path; with ``TBX_UPDATE_SCREENSHOTS=1`` they replace
docs/screenshots/hparams.png, custom_scalars.png, projector.png, alerts.png, bands.png
and by_tokens.png (see scripts/screenshots.sh).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import browser
from tests.demo import fit_alerts_demo
from tests.tbserver import TensorBoardServer

ROOT = Path(__file__).resolve().parents[1]
REASON = browser.available()
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
]
RUNS = {"version_0": "model.optimizer.lr=0.003", "version_1": "model.optimizer.lr=0.01"}


def _screenshot_path(tmp_path: Path, name: str) -> Path:
    if os.environ.get("TBX_UPDATE_SCREENSHOTS") == "1":
        folder = ROOT / "docs" / "screenshots"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name
    return tmp_path / name


@pytest.fixture(scope="module")
def quickstart(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TensorBoardServer, Path]]:
    """Two short quickstart runs trained by the ``tbx-lightning fit`` command, served by TensorBoard."""
    work = tmp_path_factory.mktemp("quickstart")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for override in RUNS.values():
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tbx_lightning.cli",
                "fit",
                "quickstart",
                f"paths.runs_dir={work / 'runs'}",
                "trainer.max_epochs=2",
                override,
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=work,
            timeout=150,
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    logdir = work / "runs" / "quickstart"
    server = TensorBoardServer(logdir)
    try:
        server.wait_for_runs(len(RUNS))
        yield server, logdir
    finally:
        server.stop()


# TensorBoard's HParams table shows, before any click, the first five hyperparameter
# columns (those that differ between runs first, then by name) and the first five metric
# columns by tag; these are the columns a user sees first.
FIRST_METRICS = ["train/acc", "train/loss", "trainer/epoch", "val/acc", "val/loss"]


def _table_headers(page: Any) -> list[str]:
    deadline = time.monotonic() + 90
    while True:
        headers = [h.strip() for h in page.locator(".table-header").all_inner_texts()]
        if "val/loss" in headers or time.monotonic() > deadline:
            return headers
        time.sleep(0.5)


def test_hparams_dashboard_opens_on_the_swept_key_and_the_runs_own_metrics(
    quickstart: tuple[TensorBoardServer, Path], tmp_path: Path
) -> None:
    server, _ = quickstart
    with browser.browser_page(tmp_path / "profile", width=2500, height=600) as page:
        page.goto(server.url + "/#hparams", wait_until="domcontentloaded")
        headers = _table_headers(page)
        assert headers[:2] == ["Trial ID", "Show Metrics"], headers
        hparams, metrics = headers[2:7], headers[7:]
        # The swept key first, then the run's duration (it always differs).
        assert hparams[:2] == ["model.optimizer.lr", "run.duration_s"], hparams
        plumbing = [
            h
            for h in hparams
            if h.endswith("_target_") or h.startswith(("callbacks.", "paths.", "trainer.limit_"))
        ]
        assert not plumbing, hparams
        assert metrics == FIRST_METRICS, metrics
        for run in RUNS:
            browser.find_text(page, run)
        page.screenshot(path=str(_screenshot_path(tmp_path, "hparams.png")))


def test_time_series_shows_the_runs_metrics_before_the_monitor(
    quickstart: tuple[TensorBoardServer, Path], tmp_path: Path
) -> None:
    server, _ = quickstart
    with browser.browser_page(tmp_path / "profile", width=1600, height=900) as page:
        page.goto(server.url + "/#timeseries", wait_until="domcontentloaded")
        groups: list[str] = []
        deadline = time.monotonic() + 90
        while "vitals_layers" not in groups and time.monotonic() < deadline:
            time.sleep(0.5)
            groups = [
                g.strip()
                for g in page.locator(
                    ".group-name, .group-title, .tag-group-name"
                ).all_inner_texts()
            ]
        shown = [g for g in groups if g != "Pinned"]
        assert shown[:3] == ["train", "trainer", "val"], groups
        assert shown[-2:] == ["vitals", "vitals_layers"], groups


def test_custom_scalars_put_train_and_val_of_each_metric_on_one_chart(
    quickstart: tuple[TensorBoardServer, Path], tmp_path: Path
) -> None:
    server, _ = quickstart
    with browser.browser_page(tmp_path / "profile", width=1600, height=900) as page:
        page.goto(server.url + "/#custom_scalars", wait_until="domcontentloaded")
        # Each metric's chart matches its train and val tags in both runs: 2 x 2.
        browser.find_text(page, "Matches (4)", timeout=90)
        titles = page.get_by_text("vitals_layers/grad_norm", exact=True)
        assert titles.count() >= 1, "the monitor's charts follow the metrics"
        page.wait_for_timeout(1500)
        page.screenshot(path=str(_screenshot_path(tmp_path, "custom_scalars.png")))


def test_projector_shows_the_embedding_points(
    quickstart: tuple[TensorBoardServer, Path], tmp_path: Path
) -> None:
    server, logdir = quickstart
    config = (logdir / "version_0" / "projector_config.pbtxt").read_text()
    points, dim = (int(n) for n in re.findall(r"tensor_shape: (\d+)", config)[:2])
    with browser.browser_page(tmp_path / "profile") as page:
        page.goto(server.url + "/#projector", wait_until="domcontentloaded")
        # The projector has read the tensor bytes and the metadata when it shows the count.
        browser.find_text(page, f"Points: {points}", timeout=120)
        browser.find_text(page, f"Dimension: {dim}")
        canvases = sum(frame.locator("canvas").count() for frame in page.frames)
        assert canvases >= 1
        page.wait_for_timeout(1500)  # let the point cloud settle for the picture
        page.screenshot(path=str(_screenshot_path(tmp_path, "projector.png")))


@pytest.fixture(scope="module")
def alerts_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TensorBoardServer]:
    """``tbx-lightning fit alerts_demo`` on a short budget (a spike at 14, NaN from 18), served."""
    work = tmp_path_factory.mktemp("alerts")
    output = fit_alerts_demo(work, timeout=200)
    assert "loss_spike" in output, "the terminal shows the alert too"
    server = TensorBoardServer(work / "runs" / "alerts_demo")
    try:
        server.wait_for_runs(1)
        yield server
    finally:
        server.stop()


def test_text_dashboard_shows_the_alerts_table(
    alerts_demo: TensorBoardServer, tmp_path: Path
) -> None:
    with browser.browser_page(tmp_path / "profile", width=1400, height=900) as page:
        page.goto(alerts_demo.url + "/#text", wait_until="domcontentloaded")
        # The `alerts` tag's markdown table, rendered: one row per kind and place.
        browser.find_text(page, "alerts", timeout=90)
        browser.find_text(page, "loss_spike")
        browser.find_text(page, "nonfinite_loss")
        page.wait_for_timeout(500)
        page.screenshot(path=str(_screenshot_path(tmp_path, "alerts.png")))


@pytest.fixture(scope="module")
def seeds_sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TensorBoardServer]:
    """``tbx-lightning sweep`` over 3 seeds x 2 learning rates: it ends with the band runs."""
    work = tmp_path_factory.mktemp("seeds")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tbx_lightning.cli",
            "sweep",
            "quickstart",
            "seed=1,2,3",
            "model.optimizer.lr=0.01,0.001",
            f"paths.runs_dir={work / 'runs'}",
            "trainer.max_epochs=3",
            "--name",
            "seeds",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        timeout=200,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "Bands over seed: 2 aggregate runs" in done.stdout
    server = TensorBoardServer(work / "runs" / "seeds")
    try:
        server.wait_for_runs(8)
        yield server
    finally:
        server.stop()


# Every Margin chart card of the Custom Scalars dashboard, with the shaded areas it drew:
# [title, [[fill colour, height in pixels], ...]].
_MARGIN_CARDS = """() => {
  const cards = [];
  const walk = (root) => root.querySelectorAll('*').forEach(e => {
    if (e.tagName.toLowerCase() === 'tf-custom-scalar-margin-chart-card') cards.push(e);
    if (e.shadowRoot) walk(e.shadowRoot);
  });
  walk(document);
  return cards.map(card => {
    const areas = [];
    const inner = (root) => {
      root.querySelectorAll('path.area').forEach(p => {
        if ((p.getAttribute('d') || '').length > 0)
          areas.push([getComputedStyle(p).fill, p.getBBox().height]);
      });
      root.querySelectorAll('*').forEach(e => { if (e.shadowRoot) inner(e.shadowRoot); });
    };
    inner(card.shadowRoot || card);
    const heading = (card.shadowRoot || card).querySelector('tf-card-heading');
    const text = heading && heading.shadowRoot ? heading.shadowRoot.textContent : '';
    return [card.title || text.trim(), areas];
  });
}"""


def test_custom_scalars_draw_the_band_of_each_group(
    seeds_sweep: TensorBoardServer, tmp_path: Path
) -> None:
    with browser.browser_page(tmp_path / "profile", width=1400, height=850) as page:
        page.goto(seeds_sweep.url + "/#custom_scalars", wait_until="domcontentloaded")
        browser.find_text(page, "bands", timeout=90)
        deadline = time.monotonic() + 90
        cards: list[Any] = []
        while time.monotonic() < deadline:
            cards = page.evaluate(_MARGIN_CARDS)
            if len(cards) >= 4 and all(len(areas) >= 2 for _, areas in cards):
                break
            time.sleep(0.5)
        titles = sorted(title for title, _ in cards)
        assert titles == ["train/acc", "train/loss", "val/acc", "val/loss"], cards
        for title, areas in cards:
            # One shaded band per learning rate, each with a height: the seeds differ.
            fills = {fill for fill, _ in areas}
            assert len(fills) == 2, (title, areas)
            assert all(height > 0 for _, height in areas), (title, areas)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(_screenshot_path(tmp_path, "bands.png")))


@pytest.fixture(scope="module")
def batch_sizes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TensorBoardServer]:
    """Two short ``tiny_lm`` runs with batches of 8 and 16 windows: one epoch of 24 steps each."""
    work = tmp_path_factory.mktemp("tokens")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for batch in (8, 16):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tbx_lightning.cli",
                "fit",
                "tiny_lm",
                f"paths.runs_dir={work / 'runs'}",
                f"data.batch_size={batch}",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=24",
                "trainer.log_every_n_steps=2",
                "~callbacks.embedding_projector",
                "logger.tbx.log_graph=false",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=work,
            timeout=150,
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    server = TensorBoardServer(work / "runs" / "tiny_lm")
    try:
        server.wait_for_runs(2)
        yield server
    finally:
        server.stop()


def test_scalars_draw_the_losses_against_tokens_seen(
    batch_sizes: TensorBoardServer, tmp_path: Path
) -> None:
    """``by_tokens/train/loss``: the x-axis is characters seen, so the run with twice the
    batch covers twice the data in the same steps, and both curves share one axis."""
    ends = {}
    for run, batch in (("version_0", 8), ("version_1", 16)):
        points = batch_sizes.get_json(
            "/data/plugin/scalars/scalars", {"tag": "by_tokens/train/loss", "run": run}
        )
        steps = [step for _, step, _ in points]
        assert steps and all(step % (batch * 64) == 0 for step in steps), (run, steps)
        ends[batch] = steps[-1]
    assert ends[16] == 2 * ends[8]
    with browser.browser_page(tmp_path / "profile", width=1000, height=470) as page:
        page.goto(
            batch_sizes.url + "/#scalars&tagFilter=by_tokens%2Ftrain&_smoothingWeight=0",
            wait_until="domcontentloaded",
        )
        browser.find_text(page, "by_tokens/train/loss", timeout=90)
        page.wait_for_timeout(2000)
        page.screenshot(path=str(_screenshot_path(tmp_path, "by_tokens.png")))
