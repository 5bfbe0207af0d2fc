"""The backends behind BaseStore: in-process table, shared-server client, Redis; and the wire."""
