"""The docs run as written: every code block and command of the guides, the README and
the reference pages, on a reduced budget, with the numbers the guides derive recomputed.

How a block runs is in :mod:`tests.guides`.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
from pathlib import Path
from typing import Any

import pytest

from tests.guides import (
    LANGUAGES,
    RELATIVE_TOLERANCE,
    REPO,
    commands,
    fences,
    is_excerpt,
    run_document,
    same_output,
)

DOCS = [
    "README.md",
    "docs/guide.md",
    "docs/guide.zh-CN.md",
    "docs/glossary.md",
    "docs/monitor.md",
    "docs/lightning.md",
    "docs/accelerate.md",
    "docs/api.md",
    "docs/hparams.md",
    "docs/templates.md",
    "docs/graph.md",
    "docs/projector.md",
    "docs/transformers.md",
    "docs/writer.md",
    "docs/robustness.md",
    "docs/s3.md",
    "docs/architecture.md",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings(
        # Lightning's advice on tiny CPU runs, not something the docs are about.
        "ignore:.*does not have many workers.*",
        "ignore:.*log_every_n_steps.*",
        "ignore:.*isinstance.treespec, LeafSpec.*",
    ),
]


RUN = [doc for doc in DOCS if doc != "docs/guide.zh-CN.md"]  # the same blocks as guide.md


@pytest.mark.parametrize("doc", RUN)
def test_code_blocks_run_as_shown(
    doc: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run_document(REPO / doc, tmp_path)


# ---------------------------------------------------------------------- blocks
@pytest.mark.parametrize("doc", DOCS)
def test_every_block_is_run_or_marked(doc: str) -> None:
    """A block is code that runs, an excerpt, or output/config in a language that says so."""
    for line, language, source in fences((REPO / doc).read_text(encoding="utf-8")):
        where = f"{doc}:{line}"
        assert language in LANGUAGES, f"{where}: give the block a language of {sorted(LANGUAGES)}"
        if language in ("text", "yaml", "toml", "ini"):
            for row in source.splitlines():
                usage = re.search(r"\b[A-Z][A-Z_]{2,}\b", row)  # a synopsis: upload SPOOL_DIR
                assert usage or not row.startswith(("$ ", "tbx-lightning ", "pip install")), (
                    f"{where}: a command in a {language} block; use a bash or console block"
                )


def _code(source: str, language: str) -> list[str]:
    """A block's code without comments (the two languages translate only comments)."""
    if language == "python":
        lines = [line.split("  #")[0].rstrip() for line in source.splitlines()]
        return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if language == "bash":
        return commands(source)
    return source.strip().splitlines()


def test_both_guides_run_the_same_code_under_the_same_headings() -> None:
    """The Chinese guide has the English guide's sections and blocks, so running the
    English one runs both; only prose and comments are translated."""
    en = (REPO / "docs/guide.md").read_text(encoding="utf-8")
    zh = (REPO / "docs/guide.zh-CN.md").read_text(encoding="utf-8")

    def numbers(text: str) -> list[str]:
        return re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", text, flags=re.MULTILINE)

    assert numbers(en) == numbers(zh)
    blocks_en = [(lang, _code(src, lang)) for _, lang, src in fences(en)]
    blocks_zh = [(lang, _code(src, lang)) for _, lang, src in fences(zh)]
    assert blocks_en == blocks_zh
    assert [is_excerpt(src) for _, _, src in fences(en)] == [
        is_excerpt(src) for _, _, src in fences(zh)
    ]


def test_glossary_lists_each_term_once_and_the_chinese_guide_keeps_to_it() -> None:
    text = (REPO / "docs/glossary.md").read_text(encoding="utf-8")
    rows = [r.split("|")[1:-1] for r in text.splitlines() if r.startswith("| ") and "---" not in r]
    rows = [[c.strip() for c in r] for r in rows[1:]]
    english = [r[0] for r in rows]
    chinese = [r[1] for r in rows]
    assert len(set(english)) == len(english) and len(set(chinese)) == len(chinese)
    zh = (REPO / "docs/guide.zh-CN.md").read_text(encoding="utf-8")
    for row in rows:
        for avoided in filter(None, (w.strip() for w in row[3].split(","))):
            # "嵌入投影文件" (projector files) is the term plus a word, not "投影文件".
            found = re.search(rf"(?<!{re.escape(row[1][:2])}){re.escape(avoided)}", zh)
            assert not found, f"guide.zh-CN.md uses {avoided!r}; the glossary says {row[1]!r}"
    for guide in ("docs/guide.md", "docs/guide.zh-CN.md"):
        assert "(glossary.md)" in (REPO / guide).read_text(encoding="utf-8")


# ---------------------------------------------------------------------- chapter 4
GUIDES = {"en": REPO / "docs/guide.md", "zh": REPO / "docs/guide.zh-CN.md"}


def guide_texts() -> dict[str, str]:
    return {lang: path.read_text(encoding="utf-8") for lang, path in GUIDES.items()}


def stated(text: str, pattern: str) -> float:
    """The number a guide states where ``pattern`` (one group) matches."""
    regex = pattern.replace(" ", r"\s+").replace(r"([\d.]+)", r"(\d+(?:\.\d+)?)")
    found = re.search(regex, text)
    assert found, f"the guide no longer says {pattern!r}"
    return float(next(g for g in found.groups() if g is not None))


def close(stated_value: float, true_value: float, rel: float = RELATIVE_TOLERANCE) -> bool:
    return abs(stated_value - true_value) <= rel * abs(true_value)


def test_the_sampling_bounds_of_chapter_4() -> None:
    hoeffding = math.sqrt(math.log(2 * 64 / 0.001) / (2 * 65536))
    for lang, text in guide_texts().items():
        assert f"t = sqrt(ln(128,000) / 131,072) = {hoeffding:.5f}" in text, lang
        assert f"1/sqrt(S) = {100 / math.sqrt(65536):.2f}" in text, lang
        assert f"1/sqrt(S/16) = {100 / math.sqrt(65536 / 16):.2f}" in text, lang
        assert "Φ(0.6745) = 0.75" in text and f"{1 / 0.6745:.4f} · MAD" in text, lang
        assert f"{norm_tail(8):.0e}" in text, lang  # the chance of 8 sigma


def norm_tail(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_the_alert_example_prints_what_the_docs_show_and_its_numbers_add_up(
    tmp_path: Path,
) -> None:
    """Section 4.7: the run of tests/test_alerts.py, its terminal lines, its spike
    threshold from the 40 losses before the spike, and section 4.2's gradient norms."""
    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import Callback

    from tbx_lightning import TBXLogger, TrainingMonitor
    from tests import test_alerts

    losses: dict[int, float] = {}

    class Losses(Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *args: Any) -> None:
            losses[trainer.global_step - 1] = float(outputs["loss"])

    lines: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Lines(logging.WARNING)
    alerts = logging.getLogger("tbx_lightning.alerts")
    alerts.addHandler(handler)
    try:
        logger = TBXLogger(str(tmp_path), name="sick")
        trainer = Trainer(  # as test_alerts.fit, with the losses recorded
            max_steps=80,
            accelerator="cpu",
            logger=logger,
            callbacks=[TrainingMonitor(), Losses()],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        torch.manual_seed(0)
        trainer.fit(test_alerts.Sick(), test_alerts.loader())
        log_dir = logger.log_dir
    finally:
        alerts.removeHandler(handler)

    printed = "\n".join(lines)
    for doc in ("docs/guide.md", "docs/guide.zh-CN.md", "docs/monitor.md"):
        (shown,) = [
            src
            for _, lang, src in fences((REPO / doc).read_text(encoding="utf-8"))
            if lang == "text" and src.startswith("alert loss_spike") and "nonfinite" in src
        ]
        assert same_output(shown, printed, tmp_path) is None, doc

    history = [losses[step] for step in range(40)]
    median = statistics.median(history)
    mad = statistics.median(abs(x - median) for x in history)
    scale = 1.4826 * mad
    threshold = median + 8 * scale
    acc = test_alerts.read(log_dir)
    first = {
        tag: acc.Scalars(tag)[0].value
        for tag in (
            "vitals_layers/grad_norm/net.0",
            "vitals_layers/grad_norm/net.2",
            "vitals/grad_norm_total",
        )
    }
    net0, net2, total = first.values()
    assert math.isclose(math.hypot(net0, net2), total, rel_tol=1e-5)
    for lang, text in guide_texts().items():
        assert "MSE" in text and "SGD" in text, lang
        assert f"m = {median:.4g}" in text, lang
        assert f"MAD = {mad:.4g}" in text, lang
        assert f"1.4826 × {mad:.4g} = {scale:.4f}" in text, lang
        assert f"{median:.4g} + 8 × {scale:.4f} = {threshold:.4g}" in text, lang
        assert f"0.01 × {median:.4g}" in text, lang
        assert f"sqrt({net0:.3f}² + {net2:.3f}²) = {total:.3f}" in text, lang
        assert f"{net0:.3f}（`net.0`）" in text or f"{net0:.3f} (`net.0`)" in text, lang


def test_the_update_ratio_of_a_lora_layer_at_step_0_is_derived_and_measured(
    tmp_path: Path,
) -> None:
    """Section 4.3: r0 = lr * sqrt(n_B) / ||A|| for the LoRA model of tests/test_lora.py,
    and what a fit of that model logs at lr 0.3 and 3e-3."""
    from lightning.pytorch import Trainer
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tbx_lightning import TBXLogger, TrainingMonitor
    from tests.lora import LoRAModule, lora_llama, token_batches

    model = lora_llama()
    params = dict(model.named_parameters())
    layer = "base_model.model.model.layers.0.self_attn.{}.lora_{}.default.weight"
    norms = {p: params[layer.format(p, "A")].norm().item() for p in ("q_proj", "v_proj")}
    n_b = {p: params[layer.format(p, "B")].numel() for p in ("q_proj", "v_proj")}
    assert n_b == {"q_proj": 128, "v_proj": 64}

    def r0(lr: float, proj: str) -> float:
        return lr * math.sqrt(n_b[proj]) / norms[proj]

    # Layer 1 has its own A; the median of four is the mean of the middle two.
    layer1 = {
        p: params[layer.replace("layers.0", "layers.1").format(p, "A")].norm().item()
        for p in ("q_proj", "v_proj")
    }
    ratios = sorted(
        [r0(0.3, p) for p in norms] + [0.3 * math.sqrt(n_b[p]) / layer1[p] for p in layer1]
    )
    median0 = (ratios[1] + ratios[2]) / 2

    logged = {}
    for lr, steps in ((0.3, 6), (3e-3, 11)):
        monitor = TrainingMonitor(norm_every_n_steps=5, hist_every_n_steps=0)
        Trainer(
            logger=TBXLogger(str(tmp_path), name=str(lr)),
            max_steps=steps,
            precision="bf16-mixed",
            accumulate_grad_batches=2,
            gradient_clip_val=1.0,
            callbacks=[monitor],
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(LoRAModule(lr=lr), token_batches())
        acc = EventAccumulator(str(tmp_path / str(lr) / "version_0"))
        acc.Reload()
        logged[lr] = {e.step: e.value for e in acc.Scalars("vitals/update_ratio")}
        kinds = {a.kind for a in monitor.monitor.alerts}  # type: ignore[union-attr]
        assert kinds == ({"update_ratio_high", "lr_out_of_range"} if lr == 0.3 else set())
    assert close(logged[0.3][0], median0, 0.02)  # bf16 mixed precision rounds a little

    for lang, text in guide_texts().items():
        for proj in norms:
            assert f"‖A‖ = {norms[proj]:.4f}" in text, lang
            assert f"= {r0(0.3, proj):.3f}" in text, lang
        said = stated(text, r"(?:layers is|中位数为) ([\d.]+)")
        assert said == round(median0, 3), lang
        assert f"{0.01 * median0:.4f}" in text, lang  # the same formula at lr 3e-3
        assert close(
            stated(text, r"\(([\d.]+) at step 5\)|第 5 步为 ([\d.]+)"), logged[0.3][5], 0.05
        ), lang
        assert f"{logged[3e-3][10]:.4f}" in text, lang


def test_perplexity_jensen_and_mfu_come_from_the_run_the_guides_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sections 4.1, 4.6 and 4.8: one tiny_lm run with a CPU peak given."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tbx_lightning import cli

    command = (
        "tbx-lightning fit tiny_lm trainer.max_epochs=1 data.batch_size=4 "
        "+callbacks.training_monitor.peak_flops=83.2e9"
    )
    for text in guide_texts().values():
        assert command in text
    monkeypatch.chdir(tmp_path)
    assert cli.main([*command.split()[1:], "trainer.enable_progress_bar=false"]) == 0
    acc = EventAccumulator(str(tmp_path / "runs/tiny_lm/version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    first_loss = acc.Scalars("train/loss")[0]
    first_ppl = acc.Scalars("train/perplexity")[0]
    val_loss = acc.Scalars("val/loss")[-1].value
    val_ppl = acc.Scalars("val/perplexity")[-1].value
    mfu = acc.Scalars("vitals/mfu")[0]
    sps = {e.step: e.value for e in acc.Scalars("vitals/samples_per_sec")}[mfu.step]
    flops = mfu.value * 83.2e9 * (4 / sps)  # F = MFU * P * t, t the window's step time
    assert (first_loss.step, first_ppl.step, mfu.step) == (4, 59, 5)
    assert val_ppl > math.exp(val_loss)  # Jensen: 2 validation batches of different loss

    patterns = {
        "en": {
            "loss": r"`train/loss` \(step 4, one batch\) is ([\d.]+)",
            "exp": r"and exp\([\d.]+\) = ([\d.]+), close to 96",
            "ppl": r"The first `train/perplexity` is ([\d.]+)",
            "val_loss": r"`val/loss` is ([\d.]+)",
            "val_exp": r"and exp\([\d.]+\) = ([\d.]+), while",
            "val_ppl": r"while `val/perplexity` is ([\d.]+)",
            "flops": r"F = ([\d.]+)e8 FLOPs per step",
        },
        "zh": {
            "loss": r"第一个记录的 `train/loss`（第 4 步，单个批次）是 ([\d.]+)",
            "exp": r"exp\([\d.]+\) = ([\d.]+)，\s*接近 96",
            "ppl": r"第一个 `train/perplexity` 是 ([\d.]+)",
            "val_loss": r"`val/loss` 为 ([\d.]+)",
            "val_exp": r"`val/loss` 为 [\d.]+，exp\([\d.]+\) = ([\d.]+)",
            "val_ppl": r"而 `val/perplexity` 为 ([\d.]+)",
            "flops": r"每步 F = ([\d.]+)e8 FLOPs",
        },
    }
    for lang, text in guide_texts().items():
        got = {name: stated(text, pattern) for name, pattern in patterns[lang].items()}
        assert close(got["loss"], first_loss.value), lang
        assert close(got["exp"], math.exp(first_loss.value)), lang
        assert close(got["ppl"], first_ppl.value), lang
        assert close(got["val_loss"], val_loss, 1e-3) and close(
            got["val_exp"], math.exp(val_loss), 1e-3
        )
        assert close(got["val_ppl"], val_ppl, 1e-3), lang
        assert got["val_ppl"] > got["val_exp"], lang  # the gap the FAQ shows
        assert close(got["flops"] * 1e8, flops), lang
        # The worked MFU is the arithmetic of the numbers stated next to it.
        found = re.search(
            r"([\d.]+) samples/s.*?t = 4 / ([\d.]+) = ([\d.]+) ms.*?MFU = ([\d.]+)e8 / "
            r"\(([\d.]+) ×\s*83.2e9\) = ([\d.]+)",
            text,
            flags=re.DOTALL,
        )
        assert found, lang
        rate, rate2, t_ms, f8, t_s, value = (float(g) for g in found.groups())
        assert rate == rate2 and close(t_ms, 4 / rate * 1e3, 1e-3) and close(t_s, t_ms / 1e3, 1e-3)
        assert close(value, f8 * 1e8 / (t_s * 83.2e9), 5e-3), lang


def test_the_healthy_run_whose_spike_the_guides_explain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Section 4.4: a healthy quickstart at lr 0.01, batch 32, prints one loss_spike on
    a hard batch near convergence, and still ends well."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tbx_lightning import cli

    command = "tbx-lightning fit quickstart model.optimizer.lr=0.01 data.batch_size=32 seed=1"
    lines: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Lines(logging.WARNING)
    alerts = logging.getLogger("tbx_lightning.alerts")
    alerts.addHandler(handler)
    monkeypatch.chdir(tmp_path)
    try:
        quiet = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
        assert cli.main(command.split()[1:] + quiet) == 0
    finally:
        alerts.removeHandler(handler)
    acc = EventAccumulator(str(tmp_path / "runs/quickstart/version_0"))
    acc.Reload()
    val_acc = acc.Scalars("val/acc")[-1].value
    later = [e.value for e in acc.Scalars("train/loss") if 251 < e.step <= 260]
    for lang, text in guide_texts().items():
        assert command in text, lang
        (shown,) = [
            src
            for _, language, src in fences(text)
            if language == "text" and src.startswith("alert loss_spike: loss 0.5")
        ]
        assert same_output(shown, "\n".join(lines), tmp_path) is None, lang
        assert f"log(100)/32 = {math.log(100) / 32:.2f}" in text, lang
        assert close(stated(text, r"`val/acc`\s*(?:为 )?([\d.]+)"), val_acc), lang
        assert max(later) < stated(text, r"(?:back under|回到) ([\d.]+)"), lang
