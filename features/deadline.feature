Feature: deadlines at admission
  A task whose deadline cannot be met is refused at once with 400 DEADLINE_UNMET instead of waiting in
  the queue to fail later.

  Scenario: a predicted start past the deadline answers 400 DEADLINE_UNMET
    Given a running stack with a mock pool of 1 slot and queue capacity 16 that takes 50 ms per token
    When a long task keeps the slot busy
    And I queue 5 "interactive" tasks with max_tokens 100
    And I submit a task for "mock-tiny" with prompt "urgent" and max_tokens 10 and deadline_ms 100
    Then the answer is 400 with code "DEADLINE_UNMET"
    And the error is not retriable and its predicted_start_ms is over 100

  Scenario: a deadline of zero answers 400 DEADLINE_UNMET
    Given a running stack with a mock pool
    When I submit a task for "mock-tiny" with prompt "now" and max_tokens 10 and deadline_ms 0
    Then the answer is 400 with code "DEADLINE_UNMET"
    And the error is not retriable
