Feature: interactive before batch
  One queue per replica set with two classes: dispatch takes the oldest interactive task and takes a batch
  task only when no interactive task waits.

  Scenario: an interactive task overtakes a batch task queued before it
    Given a running stack with a mock pool of 1 slot and queue capacity 16 that takes 50 ms per token
    When a long task keeps the slot busy
    And I queue a "batch" task named "report"
    And I queue an "interactive" task named "chat"
    Then the queue position of "chat" is 0
    And the queue position of "report" is 1
    When the long task is canceled
    Then "chat" is dispatched while "report" is still queued
    And once "chat" is canceled, "report" runs to its end
