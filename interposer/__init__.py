"""Both ends of the interposition: wire format, client, pyACL shim, translator and handle tables."""
