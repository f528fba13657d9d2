"""Prefect flows and the `itune` command line."""
