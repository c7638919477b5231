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
