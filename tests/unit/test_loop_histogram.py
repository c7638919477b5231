"""The relay's lock-free histogram exposes exactly what prometheus_client's Histogram does for the
same observations: the same series, ``le`` labels, cumulative counts, count and sum."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from llorch_gateway.metrics import RELAY_LAG_BUCKETS_MS, LoopHistogram

# the bounds themselves (le is inclusive), values between and past them, zero and negatives
VALUES = st.one_of(
    st.sampled_from([float(b) for b in RELAY_LAG_BUCKETS_MS]),
    st.floats(min_value=-1.0, max_value=1e6, allow_nan=False),
)


def _samples(registry: CollectorRegistry) -> list[tuple[str, str, float]]:
    return sorted(
        (s.name, s.labels.get("le", ""), s.value)
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    )


@given(st.lists(VALUES, max_size=50))
def test_the_exposition_matches_prometheus_clients_histogram(values: list[float]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopHistogram("lag_ms", "help", RELAY_LAG_BUCKETS_MS, ours)
    reference = Histogram("lag_ms", "help", buckets=RELAY_LAG_BUCKETS_MS, registry=theirs)
    for v in values:
        loop.observe(v)
        reference.observe(v)
    got, want = _samples(ours), _samples(theirs)
    assert [(n, le) for n, le, _ in got] == [(n, le) for n, le, _ in want]
    for (name, le, a), (_, _, b) in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (name, le, a, b)
    assert [f.type for f in ours.collect()] == ["histogram"]
