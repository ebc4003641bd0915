"""p11p helper: runs one vendor PKCS#11 module for the daemon, behind a pipe."""
