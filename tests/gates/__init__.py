"""Release gates (SPEC §9): the Haiku gate, its anti-cheat scan, and checks of the determinism harness."""
