Feature: swapping a pool's model
  The operator moves a pool onto another model from the catalog. The new engine starts and passes its
  self-test beside the old one, then the pool switches in one step; what was running finishes on the
  old engine. If the new model cannot start, nothing changes for the users of the pool.

  Scenario: a reload swaps the model under a running task, and a broken model rolls back
    Given a running stack with one mock pool "mock-a" whose catalog also holds "mock-v2" and "broken"
    When a task of 40 tokens is streaming on "mock-a"
    And I reload "mock-a" onto "mock-v2" and wait
    Then the reload answers 200 with the digest of "mock-v2"
    And the streaming task runs to its end on replica "mock-a-r0"
    And a task for "mock-v2" runs to its end on replica "mock-a-r0-g1"
    When I reload "mock-a" onto "broken" and wait
    Then the reload answers 409 "RELOAD_FAILED", rolled back
    And pool "mock-a" still serves "mock-v2" and its health shows "RELOAD_FAILED"
    And a task for "mock-v2" runs to its end on replica "mock-a-r0-g1"
