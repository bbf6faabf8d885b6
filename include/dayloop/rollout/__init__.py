"""Rollout: putting registered versions on the serving tier (deploy, routing, outcomes)."""
