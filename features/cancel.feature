Feature: cancel a running task
  A client cancels a task while it streams; the stream ends with a CANCELED error and nothing after it.

  Scenario: canceling after the first token ends the stream with CANCELED
    Given a running stack with a mock pool that takes 50 ms per token
    When I submit a task for "mock-tiny" with prompt "Tell me a very long story" and max_tokens 1000
    Then the answer is 202 with a task_id, a stream_url and an X-Correlation-Id
    When I follow the stream until the first token
    And I cancel the task
    Then the cancel answer is 204
    When I read the stream to the end
    Then the last event is an "error" with code "CANCELED"
    And the error counts every token that was streamed before it
    And the task's status is "canceled"
    And the pool frees its slot
    And a replay of the stream ends with the same error and has no token after it
    And canceling the task again answers 204
