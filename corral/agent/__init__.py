"""The agent: one per instance. Registers, heartbeats, runs job attempts."""
