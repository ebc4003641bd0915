"""p11p daemon: the virtual view, the policy, the members and their helpers."""
