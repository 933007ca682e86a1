"""What happens to a received instance: durable ingest and the acceptance policy, the analysis
worker, wake-ups and leases, routing and export."""
