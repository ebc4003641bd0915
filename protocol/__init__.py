"""p11p wire protocol: the function tables, the codec and the framing (no I/O)."""
