"""The `hsmscep` command: argument parsing, key bootstrap (init, import-ca, rollover), and
the server launch. May import everything except hsmscep.testing.
"""
