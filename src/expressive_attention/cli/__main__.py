"""python -m expressive_attention.cli ... (the same as the `ea` script)."""
import sys

from . import main

sys.exit(main())
