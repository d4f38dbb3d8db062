"""The `apiary` command line: one sub-command per service, plus keys, probes and the local swarm."""
