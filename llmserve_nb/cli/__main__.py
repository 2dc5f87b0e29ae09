"""`python -m llmserve_nb.cli`, the same as the `llmserve-nb` script."""
import sys

from llmserve_nb.cli import main

sys.exit(main())
