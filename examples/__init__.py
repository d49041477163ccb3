"""Runnable examples: a character-level LM, a Transformer chatbot and a BiLSTM classifier.

Each module is a script with a ``main(argv) -> summary`` function; see examples/README.
"""
