Feature: capability and replica set discovery
  Before it plans any work, a client asks what the orchestrator offers: which engines and models it
  serves, which features they have, what its own API token may spend, and how many slots each device
  has free. The replica sets show each ready set's slots, queue, full-queue policy and SLO figures.

  Scenario: a client discovers engines, models, features, its own rate limits and per-device concurrency
    Given my API token is limited to 100 requests per second and 20000 tokens per minute
    And a running stack with a mock pool of 2 slots on fake GPU 0 "Fake 12GB" with 12288 MiB of VRAM
    When I ask for the capabilities once the GPU is reported
    Then the API version is "1.0.0"
    And the only engine is "mock", serving model "mock-tiny" for "chat" and "completion" with a context of 2048
    And the engine offers sessions, budgets, kv hints and the "reject" and "drop-lru" queue policies
    And my rate limits read 100 requests per second and 20000 tokens per minute
    And device "0" is a "Fake 12GB" with 12288 MiB of VRAM and 2 of 2 slots free
    And 2 of 2 slots are free in total

  Scenario: without limits on the API token its rate limits read as unlimited
    Given a running stack with a mock pool
    When I ask for the capabilities
    Then the API version is "1.0.0"
    And my rate limits read as unlimited
    And device "cpu" has no GPU name or VRAM and 1 of 1 slots free

  Scenario: the replica sets show a ready set with its slots, queue, full policy and SLO
    Given a running stack with a mock pool of 1 slot and queue capacity 3 under "drop-lru" that takes 20 ms per token
    When I list the replica sets
    Then there is one ready "mock" replica set for model "mock-tiny" made of pool "mock-a"
    And the replica set has 1 of 1 slots free at load 0.0, with nothing queued
    And its queue takes 3 tasks under full_policy "drop-lru"
    And its SLO figures are null before any task has ended
    When a long task keeps the slot busy
    And I queue a "batch" task named "report"
    Then the replica set soon shows 0 of 1 slots free at load 1.0, with 0 interactive and 1 batch task queued
    When the long task is canceled
    And the task named "report" runs to its end
    Then the replica set soon shows 1 of 1 slots free at load 0.0, with 0 interactive and 0 batch tasks queued
    And its SLO figures now report first-token and decode times and an on-time ratio of 1.0
