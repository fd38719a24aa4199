"""Attacks on the scheme, each measured rather than argued.

- :mod:`.wrong_keys`: the paper's sweep, accuracy of the encrypted model under random wrong keys;
- :mod:`.known_plaintext`: the key from plain/encrypted image pairs;
- :mod:`.from_weights`: the key from the encrypted model's patch embedding;
- :mod:`.finetune`: fine-tuning the encrypted model on plain images;
- :mod:`.report`: all of them on one model, as ``security-report``.
"""
