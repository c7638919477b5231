"""The estimator's position formula agrees with its own full list schedule (no claim about accuracy:
that is measured by P6 in `make bench`)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llorch.throttle import BackoffClamp
from llorch_scheduler.estimator import Estimator


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=5000), max_size=6),
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=0, max_value=300),
    st.integers(min_value=1, max_value=200),
)
def test_single_position_matches_the_list_schedule(
    running_ms: list[int], slots: int, position: int, tokens: int
) -> None:
    est = Estimator(alpha=0.2, prior_ms_per_token=25, clamp=BackoffClamp(250, 60000), clock=lambda: 7.0)
    for n, expected in enumerate(running_ms):
        est.started("rs", f"r{n}", expected // 25 or 1)
    schedule = est.starts_ms("rs", position + 1, slots, tokens)
    assert schedule == sorted(schedule)
    assert abs(est.predicted_start_ms("rs", position, slots, tokens) - schedule[-1]) <= 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=5000), max_size=70),
    st.integers(min_value=1, max_value=80),
    st.integers(min_value=0, max_value=300),
    st.integers(min_value=1, max_value=4),
)
def test_a_window_of_positions_matches_the_list_schedule(
    running_ms: list[int], slots: int, first: int, count: int
) -> None:
    est = Estimator(alpha=0.2, prior_ms_per_token=25, clamp=BackoffClamp(250, 60000), clock=lambda: 7.0)
    for n, expected in enumerate(running_ms):
        est.started("rs", f"r{n}", expected // 25 or 1)
    schedule = est.starts_ms("rs", first + count, slots, 8)
    window = est.predicted_starts("rs", first, count, slots, 8)
    assert len(window) == count
    assert all(abs(got - want) <= 1 for got, want in zip(window, schedule[first:], strict=True))


def test_on_time_probability_is_monotone_in_the_deadline() -> None:
    est = Estimator(alpha=0.2, prior_ms_per_token=25, clamp=BackoffClamp(250, 60000))
    probabilities = [
        est.on_time_probability("rs", 100, 40, deadline) for deadline in (50, 900, 1100, 1500, 5000)
    ]
    assert probabilities[0] == 0.0
    assert probabilities == sorted(probabilities) and probabilities[-1] > 0.99
    assert all(0.0 <= p <= 1.0 for p in probabilities)


def test_learning_moves_the_rate_towards_what_was_observed() -> None:
    est = Estimator(alpha=0.5, prior_ms_per_token=25, clamp=BackoffClamp(250, 60000))
    for n in range(10):
        est.started("rs", f"t{n}", 10)
        est.finished("rs", f"t{n}", tokens_out=10, decode_ms=50, ok=True)
    assert abs(est.service_ms("rs", 10) - 50) < 1
    assert 250 <= est.backoff_ms("rs", slots_total=2) <= 60000


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=5000), max_size=40),
    st.integers(min_value=65, max_value=600),
    st.integers(min_value=64, max_value=700),
)
def test_deep_positions_in_many_slots_match_the_list_schedule(
    running_ms: list[int], slots: int, first: int
) -> None:
    """Past the heap's reach, with hundreds of slots: positions inside the first round (a burst into
    idle slots) and past it agree with the full schedule."""
    est = Estimator(alpha=0.2, prior_ms_per_token=25, clamp=BackoffClamp(250, 60000), clock=lambda: 7.0)
    for n, expected in enumerate(running_ms):
        est.started("rs", f"r{n}", expected // 25 or 1)
    schedule = est.starts_ms("rs", first + 4, slots, 8)
    window = est.predicted_starts("rs", first, 4, slots, 8)
    assert all(abs(got - want) <= 1 for got, want in zip(window, schedule[first:], strict=True))
    if first + 4 <= slots - len(running_ms):  # idle slots enough for the whole window
        assert window == [0, 0, 0, 0]
