Feature: models loaded on demand
  A home lab keeps more models than its GPUs hold. An on-demand pool stays unloaded until a task needs
  it; the task is admitted and queued like any other, told that its model is loading and how long that
  should take, and served once the model is in. A model that is busy is never evicted to make room.

  Scenario: a request for a model that is not loaded waits, is told so, and is served
    Given a running stack with two on-demand mock pools of 5 GiB each on a fake 8 GiB GPU
    Then the models list shows both "model-a" and "model-b" as "unloaded"
    When I ask "model-a" for a completion
    Then its first event is "started" with phase "loading"
    And a "metrics" event with phase "loading" and a load estimate comes before its dispatch
    And the task runs to its end
    And the models list shows "model-a" as "ready" and "model-b" as "unloaded"
    When I ask "model-b" for a completion
    Then the task runs to its end
    And the models list shows "model-a" as "unloaded" and "model-b" as "ready"
    And the GPU ledger lists "pool-b" as idle on device "0" and "pool-a" as unloaded
