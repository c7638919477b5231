from __future__ import annotations

from llorch.throttle import TokenBucket, TokenWindow


def test_token_window_reserves_refuses_and_settles() -> None:
    window = TokenWindow(limit=100)
    assert window.reserve("a", prompt_est=10, max_tokens=60) == 0
    assert window.reserve("b", prompt_est=10, max_tokens=60) > 0  # 140 > 100
    window.settle("a", tokens_out=5)  # the task ended early: 15 used, not 70
    assert window.reserve("b", prompt_est=10, max_tokens=60) == 0
    window.release("b")
    assert window.reserve("c", prompt_est=0, max_tokens=85) == 0


def test_token_bucket_burst_then_wait() -> None:
    bucket = TokenBucket(rps=0.001)
    assert bucket.take() == 0  # burst max(1, 2 * rps) = 1
    assert bucket.take() > 0
