"""The guest agent's shell: its loop, virtual devices, PCM threads, outbox and status file."""
