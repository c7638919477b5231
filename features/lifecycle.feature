Feature: a model's lifecycle state at admission
  The operator moves a model through its lifecycle in the catalog, and admission follows it: a Draft
  model is not served; a Deprecated model lets the sessions that already exist go on but starts no new
  ones; a Retired model's queued tasks end, its pools drain, and new tasks are refused.

  Scenario: a Draft model is refused until it is activated again
    Given a running stack with a mock pool
    When I set "mock-tiny" to "Draft"
    Then the catalog answers 202: "mock-tiny" went from "Active" to "Draft"
    When I submit a task for "mock-tiny" with prompt "hello" and max_tokens 2
    Then the answer is 403 with code "MODEL_NOT_ACTIVE"
    And the refusal says the model is "Draft"
    When I set "mock-tiny" to "Active"
    And I submit a task for "mock-tiny" with prompt "hello" and max_tokens 2
    Then the answer is 202 with a task_id, a stream_url and an X-Correlation-Id

  Scenario: a Deprecated model keeps an existing session going but starts no new one
    Given a running stack with a mock pool
    When I run a turn of session "ongoing" to its end
    And I set "mock-tiny" to "Deprecated"
    And I submit a task for "mock-tiny" with prompt "hello" and max_tokens 2
    Then the answer is 403 with code "MODEL_DEPRECATED"
    And the refusal says the model is "Deprecated"
    When I submit a turn of session "fresh" with prompt "hello" and max_tokens 2
    Then the answer is 403 with code "MODEL_DEPRECATED"
    When I run a turn of session "ongoing" to its end
    Then session "ongoing" is open at turn 2

  Scenario: retiring a model ends its queued task, drains its pool and refuses new tasks
    Given a running stack with a mock pool of 1 slot and queue capacity 16 that takes 50 ms per token
    When a long task keeps the slot busy
    And I queue an "interactive" task named "waiting"
    Then the task "waiting" is "queued"
    When I retire "mock-tiny" with a drain deadline of 500 ms
    Then the queued task "waiting" ends with a "POOL_UNAVAILABLE" error before any token
    And the task "waiting" is "failed"
    And the long task ends with a "POOL_UNAVAILABLE" error after streaming tokens
    When I submit a task for "mock-tiny" with prompt "hello" and max_tokens 2
    Then the answer is 503 with code "POOL_UNAVAILABLE"
    And the refusal says the model is "Retired"
