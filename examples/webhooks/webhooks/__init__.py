"""Reliable outgoing webhooks: a second app on reactor's engine (README.md)."""
