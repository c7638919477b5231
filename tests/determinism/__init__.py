"""The determinism corpus (SPEC §9): the seeds the determinism gate runs, checked here."""
