"""The `procqueue` command line (installed as procqueue.cli).  It uses only procqueue's public
API: whatever the CLI needs, users of the Python API can have too."""
