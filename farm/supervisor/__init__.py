"""The supervisor: listeners, privileges, systemd integration, the arbiter and its workers."""
