"""The command line: parses arguments, calls one engine function per command, reports the result."""
