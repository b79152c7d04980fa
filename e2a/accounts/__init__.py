"""Accounts: sign-in by an emailed one-time code, the login JWT, and the API keys it manages
(docs/accounts.md)."""
