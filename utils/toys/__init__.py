"""The built-in pretrained toys (`toy`, `toy-flow`) and the tiny random models the tests build offline:
their data, their pretraining and the cache (`python -m utils.toys`)."""
