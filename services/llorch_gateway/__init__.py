"""llorch_gateway."""
