"""`python3 -m p11p.helper MODULE_PATH`: the helper process (see main.py)."""

import sys

from p11p.helper.main import main

sys.exit(main(sys.argv))
