"""The sans-IO core: every decision, made on bytes, snapshots and the time passed in."""
