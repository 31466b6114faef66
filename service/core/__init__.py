"""The small core every flow uses: settings, database, tables, domain types, errors, crypto,
logs, metrics and the Mercado Pago client."""
