"""Money and quotas: admission against limits and budgets, settlement, pricing, usage records, the ledger, alerts."""
