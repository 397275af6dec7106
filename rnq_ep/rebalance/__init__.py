"""Online rebalancing: record live loads, re-plan off the serving path, migrate copies without a stall."""
