"""Tenants' stored secret bundles (bring-your-own LLM keys), encrypted at rest: docs/secrets.md.

crypto.py: the master key and the sealing of one row; bundles.py: the bundles themselves
(create, replace, delete, list, and `resolve` for a session's start)."""
