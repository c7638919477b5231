Feature: submit and stream
  A client submits a task over the public HTTP API and follows its events as Server-Sent Events.

  Scenario: a submitted task streams its events in SPEC order
    Given a running stack with a mock pool
    When I submit a task for "mock-tiny" with prompt "Hello there" and max_tokens 6
    Then the answer is 202 with a task_id, a stream_url and an X-Correlation-Id
    When I read the stream to the end
    Then the event ids count up from 0 without gaps
    And the first event is "started"
    And a "metrics" event with phase "dispatch" comes before the first token
    And 6 "token" events arrive, numbered from 0
    And a "metrics" event with phase "decode" follows the first token
    And the last event is "end" with tokens_out 6 and finish_reason "length"
    And the task's status is "succeeded"

  Scenario: a reader who comes late or resumes gets the same events
    Given a running stack with a mock pool
    When I submit a task for "mock-tiny" with prompt "Once more" and max_tokens 4
    And I read the stream to the end
    Then reading the stream again replays the same events
    And resuming with Last-Event-ID 2 replays only the events after it
