"""Holds the drop-in `acl` package and its standard-library client, `flexnpu_client`. This directory, not the
package, goes on sys.path of interposed processes (`vdevctl shim --path`); it also builds the flexnpu-acl wheel."""
