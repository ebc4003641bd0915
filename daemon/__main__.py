"""`python3 -m p11p.daemon` is the `p11p` command."""

import sys

from p11p.daemon.cli import main

sys.exit(main())
