Feature: draining a pool for maintenance
  Before working on a machine, the operator drains its pool. The pool takes no new work; a running
  task may finish until the deadline and is then ended with POOL_UNAVAILABLE; queued work goes to the
  pools of the same model that stay up. The pool shows Drained until the operator resumes it.

  Scenario: a drained pool's task ends at the deadline, its queue is served elsewhere, and it resumes
    Given a running stack with two 1-slot mock pools "mock-a" and "mock-b" that take 20 ms per token
    And both pools report "Ready"
    When a long task runs on one of the pools
    And another long task runs on the other pool
    And I queue an "interactive" task named "waiting"
    Then the task "waiting" is "queued"
    When I drain the pool running the long task with a deadline of 300 ms
    Then the drain is accepted with a deadline of 300 ms
    And the long task ends with a "POOL_UNAVAILABLE" error after streaming tokens
    And the drained pool soon reports "Drained", live but not ready, and draining
    And the task "waiting" is "queued"
    When the task on the other pool is canceled
    Then the task "waiting" runs to its end on the other pool
    And a new task runs to its end on the other pool
    When I resume the drained pool
    Then the drained pool soon reports "Ready", live and ready, and no longer draining
