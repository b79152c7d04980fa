"""Credits: the ledger, metering of sandboxes and workspaces, and Stripe (docs/billing.md)."""
