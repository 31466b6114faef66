"""A seller's life after linking: transitions, unlink, webhooks, events, audit, re-encryption."""
