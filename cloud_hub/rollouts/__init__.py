"""The rollout controller: canary, staged waves, health gates, automatic rollback."""
