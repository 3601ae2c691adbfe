"""Integrations with other libraries (each module imports only its own library)."""
