"""Pieces every worker shares: settings from the environment, the etcd registry, the NATS request plane."""
