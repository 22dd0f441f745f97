"""Shells both agents use: configuration, logging, notifications, systemd, optional packages."""
