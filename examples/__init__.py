"""Runnable examples: a character-level LM, a Transformer chatbot and a BiLSTM classifier.

Each entry script (``char_lm.py``, ``chatbot.py``, ``classifier.py``) runs as
``python examples/<name>.py`` or ``python -m examples.<name>`` and is a module with
``main(argv) -> summary``; the shared modules each hold one concern. See docs/examples.md.
"""
