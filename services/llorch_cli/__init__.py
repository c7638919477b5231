"""llorch_cli."""
