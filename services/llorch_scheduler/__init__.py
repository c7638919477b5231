"""llorch_scheduler."""
