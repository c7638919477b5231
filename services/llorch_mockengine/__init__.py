"""llorch_mockengine."""
