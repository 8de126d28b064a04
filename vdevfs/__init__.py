"""The daemon: configuration, the FUSE filesystem of virtual device nodes, sessions, lifecycle, status."""
