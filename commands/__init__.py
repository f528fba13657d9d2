"""The `itune` command line, above the flows and deployments it starts."""
