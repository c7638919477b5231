Feature: queue full gives 429
  Under the reject policy a full queue refuses new tasks with 429 ADMISSION_REJECT and tells the client
  when to retry.

  Scenario: a full queue answers 429 ADMISSION_REJECT with Retry-After
    Given a running stack with a mock pool of 1 slot and queue capacity 1 that takes 50 ms per token
    When I submit a task for "mock-tiny" with prompt "first" and max_tokens 1000
    And I follow the stream until the first token
    And I submit a task for "mock-tiny" with prompt "second" and max_tokens 1000
    Then the answer is 202 with a task_id, a stream_url and an X-Correlation-Id
    When I submit a task for "mock-tiny" with prompt "third" and max_tokens 10
    Then the answer is 429 with code "ADMISSION_REJECT"
    And the error is retriable with policy_label "reject" and engine "mock"
    And the Retry-After header is at least 1 second and matches X-Backoff-Ms
    And X-Backoff-Ms equals the error's retry_after_ms
    And the answer carries an X-Correlation-Id

  Scenario: under drop-lru a new task evicts the oldest queued batch task, never an interactive one
    Given a running stack with a mock pool of 1 slot and queue capacity 3 under "drop-lru" that takes 50 ms per token
    When a long task keeps the slot busy
    And I queue a "batch" task named "old batch"
    And I queue an "interactive" task named "waiting"
    And I queue a "batch" task named "new batch"
    And I submit an "interactive" task named "newcomer"
    Then the answer is 202 with a task_id, a stream_url and an X-Correlation-Id
    And the stream of "old batch" ends while queued with a retriable "QUEUE_FULL_DROP_LRU" error and policy_label "drop-lru"
    And the task "old batch" is "failed"
    And the task "new batch" is "queued"
    When I submit an "interactive" task named "second newcomer"
    Then the answer is 202 with a task_id, a stream_url and an X-Correlation-Id
    And the stream of "new batch" ends while queued with a retriable "QUEUE_FULL_DROP_LRU" error and policy_label "drop-lru"
    When I submit a "batch" task named "refused"
    Then the answer is 429 with code "QUEUE_FULL_DROP_LRU"
    And the error is retriable with policy_label "drop-lru" and engine "mock"
    And the Retry-After header is at least 1 second and matches X-Backoff-Ms
    And X-Backoff-Ms equals the error's retry_after_ms
    And the task "waiting" is "queued"
    And the task "newcomer" is "queued"
    And the task "second newcomer" is "queued"
