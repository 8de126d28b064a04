"""Holds the drop-in `acl` package. This directory, not the package, goes on sys.path of interposed processes."""
