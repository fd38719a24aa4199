"""Attacks on the scheme, each measured rather than argued.

- :mod:`.wrong_keys`: the paper's sweep, accuracy of the encrypted model under random wrong keys;
- :mod:`.known_plaintext`: the key from plain/encrypted image pairs;
- :mod:`.from_weights`: the key from the encrypted model's patch embedding, with or without
  a reference model (:mod:`.stem_statistics` ranks its candidates by the model's BatchNorm
  statistics on public images);
- :mod:`.from_model`: that attack with the whole encrypted model, and the measures of an attack;
- :mod:`.ciphertext_only`: the key from encrypted images alone (:mod:`.layout_search` finds
  the layout, :mod:`.image_prior` and :mod:`.jpeg_trace` the colour and sign);
- :mod:`.position_keys`: the attack on the position-key countermeasure;
- :mod:`.finetune`: fine-tuning the encrypted model on plain images;
- :mod:`.report`: all of them on one model, as ``security-report``.

:mod:`.kernel_algebra` is their common ground: a key's action on the pb positions of a
block (kernel rows, signs, balanced flips, the block's symmetries). It imports no other
attack module, and the key-recovery attacks import one another in one direction only:
stem_statistics, then from_weights, from_model, ciphertext_only, position_keys, each
importing only modules named before it (and kernel_algebra, layout_search, jpeg_trace,
image_prior).
"""
