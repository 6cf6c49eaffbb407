"""`python -m utils.toys`: build, locate or check the pretrained toys (see utils/toys/toy.py)."""

from utils.toys.toy import main

main()
