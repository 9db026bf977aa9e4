"""``python -m trio_llm``: the same as the ``trio-llm`` command."""

import sys

from ._entry import main

if __name__ == "__main__":
    sys.exit(main())
