"""The client side of FlexNPU, standard library only: it runs in any container's `python3` with nothing installed.

Beside the `acl` shim in the directory that goes on an interposed process's sys.path (and in the `flexnpu-acl`
wheel). It never imports the daemon's modules, except in direct mode, which loads them on demand.
"""
