"""``python -m rdlm``: see `rdlm.cli`."""

import sys

from rdlm.cli import main

if __name__ == "__main__":
    sys.exit(main())
