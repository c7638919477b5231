Feature: the model catalog and its trust policy
  A home-lab operator keeps the models the stack may serve in its catalog. The configured model is
  there from the start; a new model file is added with its digest, verified before it is trusted, and
  found again by tag and state. The catalog will not overwrite an entry with other content nor delete a
  model a pool serves, and it lives on disk, so a scheduler restart keeps it. Under a strict trust
  policy only models signed by a key the operator trusts can be activated (the served mock model opts
  out with a permissive policy of its own, or its pool would refuse to load it).

  Scenario: the operator adds a model file, verifies it and finds it by tag and by state
    Given a running stack with a mock pool
    When I list the catalog
    Then the catalog lists only the configured model "mock-tiny", "Active", at its configured path
    When I add a model file as "spare" with its digest and tag "test"
    Then the catalog answers 201 with "spare" as an untrusted Draft that was never verified
    When I add the same model file as "spare" again
    Then the catalog answers 200 with "spare" as an untrusted Draft that was never verified
    When I verify "spare" and wait for the result
    Then the verification of "spare" passed and pinned the file's digest in its manifest
    And the verification warns that "spare" carries no signature
    And the catalog shows "spare" as a trusted "Draft" model whose verification passed
    And listing the catalog by tag "test" gives only "spare"
    And listing the catalog by state "Draft" gives only "spare"
    And listing the catalog by state "Active" gives only "mock-tiny"
    When I add another model file as "spare" with its digest and tag "test"
    Then the answer is 409 with code "MODEL_EXISTS"
    And the catalog entry "spare" still points at the first file

  Scenario: a model a pool serves cannot be deleted, an unused one can
    Given a running stack with a mock pool
    When I delete "mock-tiny" from the catalog
    Then the answer is 409 with code "MODEL_EXISTS"
    And the refusal names pool "mock-a" as the one serving it
    And the catalog keeps "mock-tiny"
    When I add a model file as "old" with its digest and tag "unused"
    And I delete "old" from the catalog
    Then the catalog answers 204
    And the catalog has no "old"

  Scenario: the catalog survives a scheduler restart
    Given a running stack with a mock pool
    When I add a model file as "kept" with its digest and tag "lab"
    And I verify "kept" and wait for the result
    And the scheduler is killed and started again
    Then the catalog lists exactly "kept" and "mock-tiny"
    And the catalog shows "kept" as a trusted "Draft" model whose verification passed
    And the catalog entry "kept" is tagged "lab"
    When I submit a task for "mock-tiny" with prompt "after the restart" and max_tokens 3
    And I read the stream to the end
    Then the last event is "end" with tokens_out 3 and finish_reason "length"

  Scenario: under a strict trust policy only a model signed with the lab's key can be activated
    Given a running stack whose catalog trusts only models signed by the lab's ed25519 key
    When I add a model file as "unsigned" with its digest and SBOM but no signature
    Then the answer is 400 with code "UNTRUSTED_ARTIFACT"
    And the refusal lists "missing_signature"
    And the catalog has no "unsigned"
    When I add a model file as "signed" with its digest and SBOM, signed by the lab's key
    Then the catalog answers 201 with "signed" as an untrusted Draft that was never verified
    When I set "signed" to "Active"
    Then the catalog answers 202: "signed" went from "Draft" to "Active"
    And the catalog shows "signed" as a trusted "Active" model whose verification passed
    When I add the file of "signed" as "forged", signed in the lab's name by another key
    Then the catalog answers 201 with "forged" as an untrusted Draft that was never verified
    When I set "forged" to "Active"
    Then the answer is 400 with code "UNTRUSTED_ARTIFACT"
    And the catalog shows "forged" as an untrusted "Draft" model whose verification failed
