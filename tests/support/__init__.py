"""Test support: free ports, condition waits, real child processes, a real Redis server."""
