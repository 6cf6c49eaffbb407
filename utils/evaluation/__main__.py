"""`python -m utils.evaluation`: evaluate LoRAs (see utils/evaluation/cli.py and utils/evaluation/evaluate.py)."""

import sys

from utils.evaluation.cli import main

sys.exit(main())
