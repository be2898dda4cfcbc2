"""`python -m llava_manager.train [RECIPE] [--key value ...]`."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
