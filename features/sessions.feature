Feature: sessions and budgets
  A client groups its turns into a session. The session can carry a token budget: each turn reserves
  what it may use at admission, gets back what it did not use when it ends, and is refused with 403
  BUDGET_EXHAUSTED once the budget or the allowed turns run out. An idle session expires after its TTL,
  and a client can delete it at any time.

  Scenario: a token budget is reserved at admission, refunded at the end, and enforced with the turn limit
    Given a running stack with a mock pool that ends each answer after 5 tokens and allows 3 turns per session
    When I start session "chat-1" with a budget of 100 tokens, prompt "hello" and max_tokens 40
    Then the answer is 202 for session "chat-1" with 58 budget tokens remaining
    And the answer carries no time or cost budget header
    When I read the stream to the end
    Then the last event is "end" with tokens_out 5 and finish_reason "stop"
    And the unused reservation is refunded: session "chat-1" soon has 93 budget tokens left
    And session "chat-1" has 93 budget tokens left after 1 of 3 turns
    When I submit a turn of session "chat-1" with prompt "hello" and max_tokens 100
    Then the answer is 403 with code "BUDGET_EXHAUSTED"
    And the refusal names the "tokens" budget and no task was queued
    And session "chat-1" has 93 budget tokens left after 1 of 3 turns
    When I run 2 more turns of session "chat-1" with max_tokens 1 to their end
    Then the unused reservation is refunded: session "chat-1" soon has 87 budget tokens left
    And session "chat-1" has 87 budget tokens left after 3 of 3 turns
    When I submit a turn of session "chat-1" with prompt "hello" and max_tokens 1
    Then the answer is 403 with code "BUDGET_EXHAUSTED"
    And the refusal names the "turns" budget and no task was queued
    And session "chat-1" has 87 budget tokens left after 3 of 3 turns

  Scenario: an idle session expires after its TTL, and its id then starts a fresh session
    Given a running stack with a mock pool whose sessions expire after 1500 ms without use
    When I run a turn of session "short" to its end
    Then session "short" is open at turn 1
    And session "short" is gone within 30 seconds
    When I run a turn of session "short" to its end
    Then session "short" is open at turn 1
    And session "short" is a fresh session, created after the expired one

  Scenario: deleting a session removes it, and deleting it again still answers 204
    Given a running stack with a mock pool
    When I run a turn of session "done" to its end
    Then session "done" is open at turn 1
    When I delete session "done"
    Then the delete answers 204 with an X-Correlation-Id
    And session "done" is not found
    When I delete session "done"
    Then the delete answers 204 with an X-Correlation-Id
    And session "done" is not found
