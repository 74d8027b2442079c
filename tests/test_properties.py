"""Property-based tests: config flattening round-trips, logged scalars read back exactly."""

from __future__ import annotations

import math
import tempfile
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tbx_lightning._writer import RunWriter
from tbx_lightning.hparams import flatten, is_secret_key

# Keys as configs have them: identifiers without dots that do not look like secrets.
KEYS = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,11}", fullmatch=True).filter(
    lambda key: not is_secret_key(key)
)
LEAVES = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20).filter(lambda s: "${" not in s and "\\" not in s),
    st.none(),
)


def _configs() -> st.SearchStrategy[dict[str, Any]]:
    tree = st.recursive(
        LEAVES,
        lambda children: st.one_of(
            st.dictionaries(KEYS, children, min_size=1, max_size=4),
            st.lists(
                st.dictionaries(KEYS, children, min_size=1, max_size=3), min_size=1, max_size=3
            ),
        ),
        max_leaves=25,
    )
    return st.dictionaries(KEYS, tree, max_size=6)


def _lookup(config: Any, path: str) -> Any:
    node = config
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _leaves(config: Any, path: str = "") -> dict[str, Any]:
    """Every non-None leaf of a nested config, keyed by its dot path."""
    out: dict[str, Any] = {}
    items = config.items() if isinstance(config, dict) else enumerate(config)
    for key, value in items:
        child = f"{path}.{key}" if path else str(key)
        if isinstance(value, dict | list):
            out.update(_leaves(value, child))
        elif value is not None:
            out[child] = value
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@settings(max_examples=150, deadline=None)
@given(_configs())
def test_flatten_round_trips_every_key_and_value(config: dict[str, Any]) -> None:
    flat = flatten(config)
    expected = _leaves(config)
    assert set(flat) == set(expected)
    for path, value in flat.items():
        # Each key leads back to the value it came from, with its type.
        assert _same(value, _lookup(config, path)), path
        assert _same(value, expected[path])


@settings(max_examples=60, deadline=None)
@given(_configs())
def test_flatten_of_omegaconf_equals_flatten_of_the_plain_dict(config: dict[str, Any]) -> None:
    from_omegaconf = flatten(OmegaConf.create(config))
    plain = flatten(config)
    assert set(from_omegaconf) == set(plain)
    assert all(_same(from_omegaconf[k], plain[k]) for k in plain)


TAGS = st.sampled_from(["loss", "val/acc", "a b", "ünï/cödé", "x" * 200])
CALLS = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=2**62),
        st.dictionaries(TAGS, st.floats(allow_nan=True, allow_infinity=True), min_size=1),
    ),
    max_size=40,
)


def _float32(value: float) -> np.float32:
    with np.errstate(over="ignore"):
        return np.float32(value)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CALLS)
def test_any_sequence_of_scalars_reads_back_exactly(
    calls: list[tuple[int, dict[str, float]]],
) -> None:
    with tempfile.TemporaryDirectory() as log_dir:
        with RunWriter(log_dir, flush_secs=60) as run:
            for step, metrics in calls:
                run.log_scalars(metrics, step)
        acc = EventAccumulator(log_dir)
        acc.Reload()
        expected: dict[str, list[tuple[int, np.float32]]] = {}
        for step, metrics in calls:
            for tag, value in metrics.items():
                expected.setdefault(tag, []).append((step, _float32(value)))
        assert set(acc.Tags()["scalars"]) == set(expected)
        for tag, points in expected.items():
            got = [(e.step, np.float32(e.value)) for e in acc.Scalars(tag)]
            assert [s for s, _ in got] == [s for s, _ in points]
            for (_, have), (_, want) in zip(got, points, strict=True):
                assert have.tobytes() == want.tobytes() or (np.isnan(have) and np.isnan(want))
