"""`python -m utils.evaluation`: evaluate LoRAs (see utils/evaluation/evaluate.py)."""

import sys

from utils.evaluation.evaluate import main

sys.exit(main())
