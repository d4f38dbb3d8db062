"""`python -m apiary`: the same command line as `apiary`."""

from apiary.cli.main import main

main()
