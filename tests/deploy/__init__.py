"""Helpers of the deployment tests: reading the deploy files, the real CLI's options, metric
names, the Helm chart, and a Docker engine with images built from Debian packages."""
