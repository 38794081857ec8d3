"""python -m expressive_attention.tasks [--batch 32] [--repeats 200]: the same as `ea tasks`."""
import sys

from ..cli.tasks import main

if __name__ == "__main__":
    sys.exit(main())
