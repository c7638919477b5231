"""llorch_poolmgr."""
